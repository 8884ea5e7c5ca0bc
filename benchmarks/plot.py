"""The sweep as a picture: time per decode step against batch and against prompt length, one
line per method, with the floor a step cannot beat on the machine that ran it (reading the
step's weights once at the bandwidth measured in the same run)."""
from __future__ import annotations

from typing import Dict, List, Sequence

import matplotlib

matplotlib.use("Agg")  # no display needed; must precede pyplot
import math  # noqa: E402

import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import FuncFormatter  # noqa: E402

# One fixed style per method, so the two panels (and different runs) read the same.
STYLES = {
    "upstream recompute": dict(color="tab:gray", marker="x"),
    "HF KV-cache loop": dict(color="tab:orange", marker="s"),
    "static cache, eager": dict(color="tab:purple", marker="^"),
    "static cache, compiled": dict(color="tab:green", marker="v"),
    "emu_fast, ATen step": dict(color="tab:cyan", marker="D"),
    "emu_fast": dict(color="tab:blue", marker="o", linewidth=2.5),
}


def _plain(value, _pos=None) -> str:
    return f"{value:g}"


def _plain_2_5(value, _pos=None) -> str:
    """Minor ticks of a log axis: label 2x and 5x the power of ten, so short ranges get labels."""
    if value <= 0:
        return ""
    lead = round(value / 10 ** math.floor(math.log10(value)))
    return f"{value:g}" if lead in (2, 5) else ""


def _panel(ax, points: Sequence[dict], x_key: str, methods: Sequence[str], floor_ms: float, xlabel: str, title: str):
    xs_all = [p[x_key] for p in points]
    for name in methods:
        xs, ys, noisy = [], [], []
        for p in points:
            step = p["methods"].get(name, {}).get("step_ms")
            if step is not None:  # skipped or failed points leave a gap, not a zero
                xs.append(p[x_key])
                ys.append(step)
                if p.get("busy"):
                    noisy.append((p[x_key], step))
        if xs:
            style = STYLES.get(name, {})
            ax.plot(xs, ys, label=name, **style)
            if noisy:  # hollow: measured while other processes used the CPUs
                ax.scatter(*zip(*noisy), s=70, facecolors="white", edgecolors=style.get("color"),
                           marker=style.get("marker", "o"), zorder=3)
    ax.axhline(floor_ms, color="black", linestyle="--", linewidth=1, label="weight-read floor")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(FuncFormatter(_plain))
    ax.yaxis.set_minor_formatter(FuncFormatter(_plain_2_5))
    ax.set_xticks(xs_all)
    ax.set_xticklabels([str(x) for x in xs_all])
    ax.set_xlabel(xlabel)
    ax.set_ylabel("time per decode step (ms, log scale)")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)


def plot_sweep(path: str, batch_points: List[dict], prompt_points: List[dict], methods: Sequence[str],
               floor_ms: float, floor_note: str, title: str) -> None:
    """batch_points / prompt_points: sweep points ({"batch", "prompt_tokens", "busy": bool,
    "methods": {name: {"step_ms": float or None}}}); floor_ms: the weight-read floor of one
    step; floor_note: lines under the panels (what the floor is, what is missing and why)."""
    panels = [(batch_points, "batch", "batch size (images generated at once)", "vs batch"),
              (prompt_points, "prompt_tokens", "prompt length (tokens, longest row)", "vs prompt length")]
    panels = [p for p in panels if p[0]]
    note_lines = floor_note.count("\n") + 1
    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 5.2 + 0.15 * note_lines), squeeze=False)
    for ax, (points, key, xlabel, sub) in zip(axes[0], panels):
        fixed = (f"prompt {points[0]['prompt_tokens']} tokens" if key == "batch" else f"batch {points[0]['batch']}")
        _panel(ax, points, key, methods, floor_ms, xlabel, f"{sub} ({fixed})")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), frameon=False)
    fig.suptitle(title, fontsize=10)
    # the legend along the bottom edge, the notes just above it, the panels above both
    fig.text(0.5, 0.06, floor_note, ha="center", va="bottom", fontsize=8, color="dimgray")
    fig.tight_layout(rect=(0, 0.08 + 0.03 * note_lines, 1, 0.95))
    fig.savefig(path, dpi=120)
    plt.close(fig)


def methods_in(points: Sequence[dict]) -> List[str]:
    """Methods in the order they were measured, those with at least one figure."""
    seen: Dict[str, None] = {}
    for p in points:
        for name, row in p["methods"].items():
            if row.get("step_ms") is not None:
                seen.setdefault(name)
    return list(seen)
