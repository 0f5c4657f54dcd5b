"""Progress bars (:mod:`dafusion_aug._progress`): the last line is printed once."""

from __future__ import annotations

import io

from tqdm.std import tqdm

from dafusion_aug._progress import progress_bar


def _lines(make) -> list[str]:
    out = io.StringIO()
    bar = make(out)
    for i in range(3):
        bar.set_postfix_str(f"step {i}", refresh=False)
        bar.update(1)
    bar.close()
    return [line for line in out.getvalue().replace("\r", "\n").splitlines() if line.strip()]


def test_the_last_line_is_printed_once():
    plain = _lines(lambda f: tqdm(total=3, desc="plain", file=f, mininterval=0, miniters=1))
    assert sum("3/3" in line for line in plain) == 2  # tqdm alone: drawn by the last update, again by close
    ours = _lines(lambda f: progress_bar(total=3, desc="ours", unit="it", progress=True, file=f, mininterval=0, miniters=1))
    assert sum("3/3" in line for line in ours) == 1
    assert "step 2" in ours[-1] and ours[-1].startswith("ours: 100%")


def test_a_final_change_not_yet_shown_is_still_drawn():
    out = io.StringIO()
    bar = progress_bar(total=2, desc="x", unit="it", progress=True, file=out, mininterval=0, miniters=1)
    bar.update(2)
    bar.set_postfix_str("loss=0.5", refresh=False)
    bar.close()
    assert "loss=0.5" in out.getvalue().replace("\r", "\n").splitlines()[-1]


def test_no_progress_prints_nothing():
    out = io.StringIO()
    with progress_bar(total=2, desc="x", unit="it", progress=False, file=out) as bar:
        bar.update(2)
    assert out.getvalue() == ""
