"""PNG plots of bench results (matplotlib, headless): overhead CDFs, stage breakdowns, fitted lines."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # no display on a bench machine or in CI
    import matplotlib.pyplot as plt

    return plt


def overhead_cdf(
    series: Mapping[str, Sequence[float]], path: Path, xlabel: str = "latency overhead (µs)"
) -> Path:
    """One empirical CDF line per series (batch predictions, or latency samples per proxy)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, values in series.items():
        ordered = sorted(values)
        if not ordered:
            continue
        ys = [(i + 1) / len(ordered) for i in range(len(ordered))]
        ax.step(ordered, ys, where="post", label=label)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("fraction")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def stage_bars(
    breakdown: Mapping[str, Mapping[str, float]], path: Path, ylabel: str = "µs per request"
) -> Path:
    """Stacked bars: one bar per configuration (mode), one segment per stage."""
    plt = _pyplot()
    names = list(breakdown)
    stages: list[str] = []
    for per_stage in breakdown.values():
        stages += [s for s in per_stage if s not in stages]
    fig, ax = plt.subplots(figsize=(max(4, 1.2 * len(names) + 2), 4))
    bottoms = [0.0] * len(names)
    for stage in stages:
        heights = [breakdown[n].get(stage, 0.0) for n in names]
        ax.bar(names, heights, bottom=bottoms, label=stage)
        bottoms = [b + h for b, h in zip(bottoms, heights, strict=True)]
    ax.set_ylabel(ylabel)
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1, 1))
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def fitted_lines(
    points: Mapping[str, Sequence[tuple[float, float]]],
    lines: Mapping[str, tuple[float, float]],
    path: Path,
    xlabel: str,
    ylabel: str,
) -> Path:
    """Measured points and the fitted line base + slope·x per series."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, pts in points.items():
        if not pts:
            continue
        xs = [p[0] for p in pts]
        dots = ax.plot(xs, [p[1] for p in pts], "o", label=label)
        if label in lines:
            base, slope = lines[label]
            span = [min(xs), max(xs)]
            ax.plot(span, [base + slope * x for x in span], "-", color=dots[0].get_color())
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def what_if_bars(
    overhead_us: Mapping[str, float], cpu_cores: Mapping[str, float], path: Path
) -> Path:
    """Predicted latency overhead and CPU side by side for each what-if (first: as measured)."""
    plt = _pyplot()
    labels = list(overhead_us)
    fig, (left, right) = plt.subplots(1, 2, figsize=(8, 3.5))
    left.bar(labels, [overhead_us[k] for k in labels], color="#1f77b4")
    left.set_ylabel("latency overhead (µs, median over graphs)")
    right.bar(labels, [cpu_cores[k] for k in labels], color="#ff7f0e")
    right.set_ylabel("CPU overhead (cores, median)")
    for ax in (left, right):
        ax.tick_params(axis="x", labelrotation=20)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def predicted_vs_measured(series: Mapping[str, Sequence[tuple[float, float]]], path: Path) -> Path:
    """Scatter of (measured, predicted) per series with the y = x line."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 5))
    top = 0.0
    for label, pts in series.items():
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o", label=label)
        top = max([top, *(max(p) for p in pts)])
    ax.plot([0, top], [0, top], "k--", linewidth=1, label="y = x")
    ax.set_xlabel("measured overhead (µs)")
    ax.set_ylabel("predicted overhead (µs)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
