"""Results on disk and on screen: ``results.jsonl``, ``summary.json``, the final table and the plots.

Every evaluation point of every run is one JSON record (see :data:`RECORD_FIELDS`). A *group* is one curve: the
records that share a variant, a width and any other configuration field an experiment varies (``input_len`` for time
series); its seeds are aggregated into mean, standard deviation, min and max. Plots need matplotlib (the
``[experiments]`` extra); everything else is the standard library.
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "RECORD_FIELDS",
    "GROUP_FIELDS",
    "read_records",
    "write_records",
    "group_key",
    "final_results",
    "format_table",
    "plot_metric_vs_compute",
    "plot_final_vs",
    "draw_plots",
]

#: Fields every record holds (experiments add their own, e.g. ``input_len``, ``n_heads``, ``test_mae``).
RECORD_FIELDS = (
    "experiment",
    "variant",
    "width",
    "seed",
    "preset",
    "step",
    "train_loss",
    "metric",
    "value",
    "flops_per_token",
    "macs_per_token",
    "flops_convention",
    "params",
    "tokens",
    "train_flops",
    "wall_time",
)

#: Fields that, besides the variant, tell curves apart when present in the records.
GROUP_FIELDS = ("variant", "width", "input_len")


def write_records(path: Path, records: Iterable[dict[str, Any]], mode: str = "w") -> None:
    """Write records as JSON lines (``mode='a'`` appends)."""
    with open(path, mode, encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, sort_keys=True) + "\n")


def read_records(path: Path) -> list[dict[str, Any]]:
    """The records of a ``results.jsonl``; a missing file or a line that is not a JSON object is a ValueError."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"read_records: {path} does not exist (is this a finished run's directory?)")
    records = []
    with open(path, encoding="utf-8") as f:
        for k, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                r = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"read_records: {path} line {k} is not JSON: {e}") from None
            if not isinstance(r, dict) or "variant" not in r or "value" not in r:
                raise ValueError(f"read_records: {path} line {k} is not a result record (needs 'variant' and 'value')")
            records.append(r)
    if not records:
        raise ValueError(f"read_records: {path} holds no records")
    return records


def group_key(record: dict[str, Any]) -> tuple[Any, ...]:
    """``(variant, width, input_len)`` with None where a field is absent."""
    return tuple(record.get(f) for f in GROUP_FIELDS)


def _label(key: tuple[Any, ...], widths: int) -> str:
    variant, width, _ = key
    return variant if widths <= 1 or width is None else f"{variant} (width {width})"


def _spread(values: Sequence[float]) -> dict[str, float]:
    finite = [v for v in values if v is not None and math.isfinite(v)]
    if not finite:
        return {"mean": math.nan, "std": math.nan, "min": math.nan, "max": math.nan}
    return {
        "mean": statistics.fmean(finite),
        "std": statistics.stdev(finite) if len(finite) > 1 else 0.0,
        "min": min(finite),
        "max": max(finite),
    }


def final_results(records: Sequence[dict[str, Any]], select_by: str | None = None) -> list[dict[str, Any]]:
    """Per group, one evaluation point of each seed, aggregated over seeds, best (lowest mean) first.

    The point is each seed's last one, or with ``select_by`` (e.g. ``"val_mse"``) the one with the lowest value of
    that field (early stopping on a validation metric; the earliest on ties; seeds without the field keep the last).
    ``selected_steps`` lists the chosen step of each seed.

    Example:
        >>> recs = [dict(variant="a", width=8, seed=s, step=t, value=v, metric="mse", params=10, flops_per_token=5,
        ...              macs_per_token=2, wall_time=1.0) for s, t, v in [(0, 0, 9.0), (0, 5, 1.0), (1, 5, 3.0)]]
        >>> row = final_results(recs)[0]
        >>> row["variant"], row["n"], row["mean"], row["std"], row["values"]
        ('a', 2, 2.0, 1.4142135623730951, [1.0, 3.0])
    """
    last: dict[tuple[Any, ...], dict[int, dict[str, Any]]] = {}

    def better(r: dict[str, Any], old: dict[str, Any]) -> bool:
        if select_by is not None and isinstance(r.get(select_by), float) and isinstance(old.get(select_by), float):
            return (r[select_by], r["step"]) < (old[select_by], old["step"])
        return r["step"] > old["step"]

    wall: dict[tuple[Any, ...], float] = {}
    for r in records:
        seeds = last.setdefault(group_key(r), {})
        if r["seed"] not in seeds or better(r, seeds[r["seed"]]):
            seeds[r["seed"]] = r
        key = (*group_key(r), r["seed"])
        wall[key] = max(wall.get(key, 0.0), r.get("wall_time") or 0.0)
    rows = []
    for key, seeds in last.items():
        finals = [seeds[s] for s in sorted(seeds)]
        values = [f["value"] for f in finals]
        row: dict[str, Any] = {f: v for f, v in zip(GROUP_FIELDS, key) if v is not None}
        first = finals[0]
        row.update(
            metric=first.get("metric"),
            n=len(finals),
            seeds=[f["seed"] for f in finals],
            values=values,
            **_spread(values),
            params=first.get("params"),
            flops_per_token=first.get("flops_per_token"),
            macs_per_token=first.get("macs_per_token"),
            steps=max(f.get("step", 0) for f in finals),
            selected_steps=[f.get("step") for f in finals],
            selected_by=select_by or "last step",
            wall_time_mean=statistics.fmean(wall[(*key, f["seed"])] for f in finals),  # whole runs
        )
        for extra in sorted(set(first) - set(RECORD_FIELDS) - set(GROUP_FIELDS) - {"lr"}):
            values_extra = [f.get(extra) for f in finals]
            if all(isinstance(v, float) for v in values_extra):
                row[extra] = _spread(values_extra)["mean"]
            elif all(v == values_extra[0] for v in values_extra):
                row[extra] = values_extra[0]
        rows.append(row)
    rows.sort(key=lambda r: (r.get("input_len") or 0, math.inf if math.isnan(r["mean"]) else r["mean"]))
    return rows


def _fmt(v: float) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "nan"
    return f"{v:.4g}"


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """The final results as an aligned text table (one row per group, best first within an input length)."""
    if not rows:
        return "(no results)"
    has_len = any("input_len" in r for r in rows)
    metric = rows[0].get("metric") or "value"
    head = ["variant", "width"] + (["input_len"] if has_len else [])
    head += ["seeds", f"{metric} mean ± std", "min .. max", "params", "MFLOP/token", "s/run"]
    lines = []
    for r in rows:
        cells = [str(r["variant"]), str(r.get("width", ""))] + ([str(r.get("input_len", ""))] if has_len else [])
        fpt = r.get("flops_per_token")
        cells += [
            str(r["n"]),
            f"{_fmt(r['mean'])} ± {_fmt(r['std'])}",
            f"{_fmt(r['min'])} .. {_fmt(r['max'])}",
            str(r.get("params", "")),
            _fmt(fpt / 1e6) if isinstance(fpt, (int, float)) else "",
            f"{r['wall_time_mean']:.1f}",
        ]
        lines.append(cells)
    widths = [max(len(h), *(len(c[k]) for c in lines)) for k, h in enumerate(head)]
    out = ["  ".join(h.ljust(w) for h, w in zip(head, widths)), "  ".join("-" * w for w in widths)]
    out += ["  ".join(c.ljust(w) for c, w in zip(cells, widths)) for cells in lines]
    return "\n".join(out)


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError:
        raise ImportError("plots need matplotlib: pip install 'structmat[experiments]' (or pass --no-plots)") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _curves(records: Sequence[dict[str, Any]]) -> dict[tuple[Any, ...], list[tuple[float, float, float, float]]]:
    """Per group: ``(train_flops, mean, min, max)`` over seeds at each step every seed reached."""
    by: dict[tuple[Any, ...], dict[int, list[dict[str, Any]]]] = {}
    for r in records:
        by.setdefault(group_key(r), {}).setdefault(r["step"], []).append(r)
    out = {}
    for key, steps in by.items():
        n = max(len(v) for v in steps.values())
        points = []
        for step in sorted(steps):
            rs = steps[step]
            vals = [r["value"] for r in rs if r["value"] is not None and math.isfinite(r["value"])]
            if len(rs) < n or not vals:
                continue
            x = statistics.fmean(r.get("train_flops") or 0.0 for r in rs)
            points.append((x, statistics.fmean(vals), min(vals), max(vals)))
        out[key] = points
    return out


def plot_metric_vs_compute(
    records: Sequence[dict[str, Any]], path: Path, *, title: str = "", ylabel: str | None = None, logy: bool = True
) -> Path:
    """The evaluation metric against training compute, one line per group (mean over seeds, band min..max).

    With several input lengths (time series) there is one panel per length.
    """
    plt = _pyplot()
    from matplotlib import ticker

    curves = _curves(records)
    lengths = sorted({k[2] for k in curves}, key=lambda v: v or 0)
    widths = len({k[1] for k in curves})
    fig, axes = plt.subplots(1, len(lengths), figsize=(5.5 * len(lengths), 4.2), squeeze=False)
    variants = sorted({k[0] for k in curves})
    colors = {v: plt.cm.tab10(k % 10) for k, v in enumerate(variants)}
    for ax, length in zip(axes[0], lengths):
        for key in sorted((k for k in curves if k[2] == length), key=lambda k: (k[0], k[1] or 0)):
            pts = [p for p in curves[key] if p[0] > 0]
            if not pts:  # no training compute (a baseline such as "naive"): a dashed level
                if curves[key]:
                    ax.axhline(curves[key][-1][1], color=colors[key[0]], linestyle="--", label=_label(key, widths))
                continue
            xs, mean, low, high = zip(*pts)
            ax.plot(xs, mean, label=_label(key, widths), color=colors[key[0]], marker="." if len(xs) < 30 else None)
            ax.fill_between(xs, low, high, color=colors[key[0]], alpha=0.15, linewidth=0)
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(ticker.NullFormatter())
        if logy:
            ax.set_yscale("log")
            ax.yaxis.set_major_formatter(ticker.FormatStrFormatter("%.3g"))
            ax.yaxis.set_minor_formatter(ticker.FormatStrFormatter("%.2g"))
        ax.set_xlabel("training compute (FLOPs, 3 x forward)")
        ax.grid(True, which="both", alpha=0.3)
        _label_axes(ax, ylabel or records[0].get("metric"), f"{title} (input length {length})" if length else title)
    return _save(plt, fig, path)


def plot_final_vs(
    rows: Sequence[dict[str, Any]], field: str, path: Path, *, title: str = "", ylabel: str | None = None
) -> Path:
    """The final metric (mean ± std over seeds) against ``field`` (e.g. ``input_len``), one line per variant."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4.2))
    for variant in sorted({r["variant"] for r in rows}):
        pts = sorted((r[field], r["mean"], r["std"]) for r in rows if r["variant"] == variant and field in r)
        if not pts:
            continue
        xs, mean, std = zip(*pts)
        ax.errorbar(xs, mean, yerr=std, label=variant, marker="o", capsize=3)
    ax.set_xlabel(field)
    ax.grid(True, alpha=0.3)
    _label_axes(ax, ylabel or rows[0].get("metric"), title)
    return _save(plt, fig, path)


def _label_axes(ax: Any, ylabel: str | None, title: str) -> None:
    ax.set_ylabel(ylabel or "metric")
    ax.set_title(title)
    ax.legend(fontsize=8)


def _save(plt: Any, fig: Any, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def draw_plots(
    records: Sequence[dict[str, Any]],
    out: Path,
    *,
    title: str,
    ylabel: str | None = None,
    logy: bool = True,
    select_by: str | None = None,
) -> list[Path]:
    """Every plot of a run directory: metric vs compute, and final metric vs input length when lengths vary."""
    out = Path(out)
    paths = [plot_metric_vs_compute(records, out / "metric_vs_compute.png", title=title, ylabel=ylabel, logy=logy)]
    rows = final_results(records, select_by)
    if len({r.get("input_len") for r in rows}) > 1:
        paths.append(plot_final_vs(rows, "input_len", out / "metric_vs_input_length.png", title=title, ylabel=ylabel))
    return paths
