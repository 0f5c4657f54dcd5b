"""Results of the few-shot protocol: confidence intervals, atomic CSV/JSON files, the table and the plot.

Nothing here needs a model: these functions take plain rows ``{"method", "k", "seed", "accuracy", ...}``.
The t quantile is computed here (regularised incomplete beta + bisection) so SciPy is not a dependency.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from .._io import atomic_write_bytes
from .oracle import UPPER_BOUNDS

__all__ = ["t_quantile", "mean_confidence_interval", "summarize", "paired_differences", "oracle_share", "format_table", "write_rows", "plot_summary", "augmentation_grid"]


# -- statistics ---------------------------------------------------------------------------------------
def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta function (modified Lentz, Numerical Recipes 6.4)."""
    tiny, qab, qap, qam = 1e-300, a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 500):
        m2 = 2 * m
        for aa in (m * (b - m) * x / ((qam + m2) * (a + m2)), -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))):
            d = 1.0 + aa * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + aa / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < 1e-15:
            break
    return h


def _betainc(a: float, b: float, x: float) -> float:
    """Regularised incomplete beta function I_x(a, b)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _betacf(a, b, x) / a
    return 1.0 - front * _betacf(b, a, 1.0 - x) / b


def _t_cdf(t: float, df: float) -> float:
    tail = 0.5 * _betainc(df / 2.0, 0.5, df / (df + t * t))
    return 1.0 - tail if t >= 0 else tail


def t_quantile(q: float, df: float) -> float:
    """The ``q`` quantile of Student's t distribution with ``df`` degrees of freedom.

    Args:
        q: probability in (0, 1), e.g. 0.975 for a two-sided 95% interval.
        df: degrees of freedom, > 0.

    Returns:
        ``t`` with ``P(T <= t) = q`` (accurate to about 1e-10).

    Raises:
        ValueError: ``q`` outside (0, 1) or ``df <= 0``.

    Example:
        >>> round(t_quantile(0.975, 4), 4)
        2.7764
    """
    if not 0.0 < q < 1.0:
        raise ValueError(f"q must be in (0, 1), got {q!r}")
    if not df > 0:
        raise ValueError(f"df must be > 0, got {df!r}")
    if q < 0.5:
        return -t_quantile(1.0 - q, df)
    lo, hi = 0.0, 1.0
    while _t_cdf(hi, df) < q:
        hi *= 2.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if _t_cdf(mid, df) < q:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-12 * max(1.0, hi):
            break
    return 0.5 * (lo + hi)


def mean_confidence_interval(values: Sequence[float], confidence: float = 0.95) -> tuple[float, float, float]:
    """Mean and two-sided t confidence interval of ``values`` (sample standard deviation, n - 1).

    Args:
        values: the measurements (at least one).
        confidence: coverage of the interval, in (0, 1).

    Returns:
        ``(mean, low, high)``; with one value the interval is ``(nan, nan)``.

    Raises:
        ValueError: no values, or ``confidence`` outside (0, 1).

    Example:
        >>> m, lo, hi = mean_confidence_interval([1.0, 2.0, 3.0])
        >>> m, round(hi - m, 4)
        (2.0, 2.4841)
    """
    vals = [float(v) for v in values]
    if not vals:
        raise ValueError("values must hold at least one number, got []")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence!r}")
    n = len(vals)
    mean = math.fsum(vals) / n
    if n < 2:
        return mean, math.nan, math.nan
    sd = math.sqrt(math.fsum((v - mean) ** 2 for v in vals) / (n - 1))
    half = t_quantile(0.5 + confidence / 2.0, n - 1) * sd / math.sqrt(n)
    return mean, mean - half, mean + half


def summarize(rows: Iterable[Mapping[str, Any]], confidence: float = 0.95, key: str = "accuracy") -> list[dict[str, Any]]:
    """Group rows by ``(method, k)`` and give each group's mean and t confidence interval.

    Args:
        rows: dicts with ``method``, ``k``, ``seed`` and ``key``.
        confidence: coverage of the interval.
        key: the measurement to summarise.

    Returns:
        One dict per ``(method, k)`` (methods in first-seen order, k ascending): ``method``, ``k``, ``n``,
        ``mean``, ``std``, ``ci_low``, ``ci_high``, ``half_width`` (``nan`` when n = 1), ``seeds``.
    """
    groups: dict[tuple[str, int], list[Mapping[str, Any]]] = {}
    order: list[str] = []
    for r in rows:
        if r["method"] not in order:
            order.append(r["method"])
        groups.setdefault((r["method"], int(r["k"])), []).append(r)
    out = []
    for (method, k), members in sorted(groups.items(), key=lambda kv: (order.index(kv[0][0]), kv[0][1])):
        vals = [float(m[key]) for m in members]
        mean, lo, hi = mean_confidence_interval(vals, confidence)
        sd = math.sqrt(math.fsum((v - mean) ** 2 for v in vals) / (len(vals) - 1)) if len(vals) > 1 else math.nan
        out.append(
            {
                "method": method,
                "k": k,
                "n": len(vals),
                "mean": mean,
                "std": sd,
                "ci_low": lo,
                "ci_high": hi,
                "half_width": (hi - mean) if len(vals) > 1 else math.nan,
                "seeds": sorted(int(m["seed"]) for m in members),
            }
        )
    return out


def paired_differences(
    rows: Iterable[Mapping[str, Any]], method: str, reference: str, confidence: float = 0.95, key: str = "accuracy"
) -> list[dict[str, Any]]:
    """``method`` minus ``reference`` per k, paired by seed (the same few-shot subset), with a t interval.

    Pairing removes the spread between subsets that both methods share, so the interval is the one to read
    when asking whether ``method`` beats ``reference``.

    Args:
        rows: dicts with ``method``, ``k``, ``seed`` and ``key``.
        method, reference: the two methods to compare.
        confidence: coverage of the interval.
        key: the measurement.

    Returns:
        Dicts shaped like :func:`summarize`'s (so :func:`format_table` prints them), with ``method`` set to
        ``"{method} - {reference}"``, one per k where both methods have a seed in common.

    Example:
        >>> rows = [dict(method=m, k=1, seed=s, accuracy=a) for m, s, a in
        ...         [("a", 0, 0.7), ("a", 1, 0.8), ("b", 0, 0.6), ("b", 1, 0.6)]]
        >>> round(paired_differences(rows, "a", "b")[0]["mean"], 4)
        0.15
    """
    by: dict[tuple[str, int, int], float] = {(r["method"], int(r["k"]), int(r["seed"])): float(r[key]) for r in rows}
    diffs = [
        {"method": f"{method} - {reference}", "k": k, "seed": seed, key: v - by[(reference, k, seed)]}
        for (m, k, seed), v in by.items()
        if m == method and (reference, k, seed) in by
    ]
    return summarize(diffs, confidence, key)


def format_table(summary: Sequence[Mapping[str, Any]], percent: bool = True, signed: bool = False) -> str:
    """A Markdown table: one row per method, one column per k, cells ``mean ± half-width`` (``signed``: the
    mean with its sign, ``+1.2``, for differences)."""
    methods: list[str] = []
    for s in summary:
        if s["method"] not in methods:
            methods.append(s["method"])
    shots = sorted({int(s["k"]) for s in summary})
    cell = {(s["method"], int(s["k"])): s for s in summary}
    scale = 100.0 if percent else 1.0
    number = "{:+.1f}" if signed else "{:.1f}"
    lines = ["| method | " + " | ".join(f"k = {k}" for k in shots) + " |", "| --- |" + " ---: |" * len(shots)]
    for m in methods:
        parts = []
        for k in shots:
            s = cell.get((m, k))
            if s is None:
                parts.append("")
            elif math.isnan(s["half_width"]):
                parts.append(f"{number.format(s['mean'] * scale)} (n={s['n']})")
            else:
                parts.append(f"{number.format(s['mean'] * scale)} ± {s['half_width'] * scale:.1f}")
        label = f"{m} (upper bound: reads the renderer)" if m in UPPER_BOUNDS else m
        lines.append(f"| {label} | " + " | ".join(parts) + " |")
    return "\n".join(lines)


def oracle_share(rows: Iterable[Mapping[str, Any]], method: str, oracle: str = "oracle-scene", reference: str = "baseline",
                 key: str = "accuracy") -> dict[int, float]:
    """How much of the reachable gain ``method`` takes, per k: ``mean(method - reference) / mean(oracle - reference)``
    over the seeds all three share (NaN where the oracle gains nothing).

    Example:
        >>> rows = [dict(method=m, k=1, seed=0, accuracy=a) for m, a in [("baseline", 0.5), ("m", 0.6), ("oracle-scene", 0.7)]]
        >>> round(oracle_share(rows, "m")[1], 3)
        0.5
    """
    by = {(r["method"], int(r["k"]), int(r["seed"])): float(r[key]) for r in rows}
    out: dict[int, float] = {}
    for k in sorted({k for (_, k, _) in by}):
        seeds = [s for (m, kk, s) in by if m == method and kk == k and (oracle, k, s) in by and (reference, k, s) in by]
        if not seeds:
            continue
        gain = math.fsum(by[(method, k, s)] - by[(reference, k, s)] for s in seeds)
        reachable = math.fsum(by[(oracle, k, s)] - by[(reference, k, s)] for s in seeds)
        out[k] = gain / reachable if reachable > 0 else math.nan
    return out


# -- files --------------------------------------------------------------------------------------------
def _atomic_write(path: Path, data: bytes) -> Path:
    atomic_write_bytes(path, data, suffix=path.suffix)
    return path


def write_rows(rows: Sequence[Mapping[str, Any]], csv_path: str | os.PathLike, json_path: str | os.PathLike, extra: Mapping[str, Any] | None = None) -> None:
    """Write the rows as CSV and as JSON (``{"rows": [...], **extra}``), each atomically."""
    columns: list[str] = []
    for r in rows:
        columns.extend(c for c in r if c not in columns)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow({c: r.get(c, "") for c in columns})
    _atomic_write(Path(csv_path), buf.getvalue().encode("utf-8"))
    payload = {**dict(extra or {}), "rows": list(rows)}
    _atomic_write(Path(json_path), json.dumps(payload, indent=1, default=str, allow_nan=True).encode("utf-8"))


def require_modules(modules: Mapping[str, str], needed_by: str, extra: str) -> None:
    """Fail before any work when optional dependencies are missing, naming them and the extra that installs them.

    Args:
        modules: import name -> distribution name (``{"sklearn": "scikit-learn"}``).
        needed_by: what needs them, for the message.
        extra: the dafusion-aug extra that installs them all.

    Raises:
        ImportError: one or more are not installed.
    """
    import importlib.util

    missing = [dist for module, dist in modules.items() if importlib.util.find_spec(module) is None]
    if missing:
        raise ImportError(f"{needed_by} needs {', '.join(missing)}, which {'is' if len(missing) == 1 else 'are'} not installed: "
                          f'pip install "dafusion-aug[{extra}]"')


def plot_summary(summary: Sequence[Mapping[str, Any]], path: str | os.PathLike, title: str | None = None) -> Path:
    """Plot accuracy (%) against k per method, with confidence-interval error bars, as a PNG.

    Uses matplotlib's Agg canvas directly (no pyplot), so the caller's backend is left alone.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 4.4), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    methods: list[str] = []
    for s in summary:
        if s["method"] not in methods:
            methods.append(s["method"])
    shots = sorted({int(s["k"]) for s in summary})
    for i, m in enumerate(methods):
        pts = [s for s in summary if s["method"] == m]
        ks = [int(s["k"]) for s in pts]
        xs = [k * (1.0 + 0.03 * (i - (len(methods) - 1) / 2)) for k in ks]  # small offsets: bars stay readable
        ys = [100.0 * s["mean"] for s in pts]
        err = [0.0 if math.isnan(s["half_width"]) else 100.0 * s["half_width"] for s in pts]
        ax.errorbar(xs, ys, yerr=err, marker="o", capsize=3, label=m)
    lows = [100.0 * (s["ci_low"] if not math.isnan(s["ci_low"]) else s["mean"]) for s in summary]
    highs = [100.0 * (s["ci_high"] if not math.isnan(s["ci_high"]) else s["mean"]) for s in summary]
    if lows:  # accuracy lives in [0, 100]: wide intervals of few seeds are cut at the axis limits
        ax.set_ylim(max(0.0, min(lows) - 5.0), min(100.0, max(highs) + 5.0) + 1.0)
    ax.set_xscale("log", base=2)
    ax.set_xticks(shots)
    ax.set_xticklabels([str(k) for k in shots])
    ax.set_xlabel("examples per class (k)")
    ax.set_ylabel("class-balanced test accuracy (%)")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    if title:
        ax.set_title(title, fontsize=10)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return _atomic_write(Path(path), buf.getvalue())


def augmentation_grid(
    rows: Sequence[tuple[str, Sequence[Any]]], columns: Sequence[str], path: str | os.PathLike, title: str | None = None
) -> Path:
    """Draw labelled rows of images (uint8 ``(H, W, 3)`` arrays or PIL images) as a PNG grid.

    Args:
        rows: ``(row label, images)``; every row has ``len(columns)`` images (``None`` draws an empty cell).
        columns: column titles.
        path: the PNG to write.
        title: optional figure title.
    """
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    n_r, n_c = max(1, len(rows)), len(columns)
    fig = Figure(figsize=(1.1 * n_c + 1.4, 1.1 * n_r + (0.6 if title else 0.3)), dpi=110)
    FigureCanvasAgg(fig)
    axes = fig.subplots(n_r, n_c, squeeze=False)
    for r, (label, images) in enumerate(rows):
        if len(images) != n_c:
            raise ValueError(f"row {label!r} has {len(images)} images, expected one per column ({n_c})")
        for c, im in enumerate(images):
            ax = axes[r][c]
            ax.set_xticks([])
            ax.set_yticks([])
            if im is not None:
                ax.imshow(np.asarray(im), interpolation="nearest")
            if r == 0:
                ax.set_title(columns[c], fontsize=8)
            if c == 0:
                ax.set_ylabel(label, fontsize=7, rotation=0, ha="right", va="center")
    if title:
        fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return _atomic_write(Path(path), buf.getvalue())
