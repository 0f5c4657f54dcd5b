"""Progress bars: tqdm's, with the last line printed once.

tqdm redraws a bar when it closes (to show the overall rate), so a bar whose last update was already drawn
prints its final line twice wherever ``\\r`` does not overwrite it: CI logs, ``2>&1 | tee``, files.
"""

from __future__ import annotations

from typing import Any

from tqdm.auto import tqdm as _auto_tqdm
from tqdm.autonotebook import tqdm as _notebook_or_text
from tqdm.std import tqdm as _std_tqdm

_TEXT = _notebook_or_text is _std_tqdm  # outside notebooks tqdm.auto draws text (a widget redraws in place)

__all__ = ["progress_bar"]


class _OnceTqdm(_auto_tqdm):
    """A text bar that skips its closing redraw when the screen already shows the final count and postfix."""

    _shown: tuple[Any, ...] | None = None
    _closing = False

    def display(self, msg: str | None = None, pos: int | None = None) -> bool:
        state = (self.n, self.postfix)
        if self._closing and msg is None and state == self._shown:
            return True  # the final line is on screen already
        if msg is None:
            self._shown = state
        return super().display(msg, pos)

    def close(self) -> None:
        self._closing = True
        super().close()


def progress_bar(*, total: int | None, desc: str, unit: str, progress: bool, **kwargs: Any):
    """A tqdm bar (a widget in notebooks) that prints its last line once; disabled unless ``progress``.

    Args:
        total, desc, unit: as tqdm takes them.
        progress: show the bar.
        **kwargs: other tqdm arguments (``initial``, ``smoothing``, ``file``, ...).

    Returns:
        The bar; use it as a context manager or call ``close()``.
    """
    cls = _OnceTqdm if _TEXT else _auto_tqdm
    kwargs.setdefault("dynamic_ncols", True)
    return cls(total=total, desc=desc, unit=unit, disable=not progress, **kwargs)
