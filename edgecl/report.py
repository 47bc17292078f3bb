"""Human-readable outputs of a benchmark run: the R heatmap, comparison table and plot."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

# training MB: what the device keeps to go on learning; deployable MB: what serving every task
# needs (see `edgecl.learners.Footprint`); MB = 10^6 bytes
COLUMNS = ("method", "ACC", "BWT", "FWT", "wall s", "samples/s", "training MB", "deployable MB")


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def summary_row(result: dict[str, Any]) -> tuple[str, ...]:
    fp = result["footprint"]
    return (result["method"], f"{result['acc']:.3f}", f"{result['bwt']:+.3f}",
            f"{result['fwt']:+.3f}", f"{result['wall_s']:.1f}", f"{result['samples_per_s']:,.0f}",
            f"{fp['training_bytes'] / 1e6:.2f}", f"{fp['deployable_bytes'] / 1e6:.2f}")


def markdown_table(results: list[dict[str, Any]]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(summary_row(r)) + " |" for r in results]
    return "\n".join(lines) + "\n"


def plot_accuracy_matrix(R: np.ndarray, path: Path, title: str) -> None:
    plt = _pyplot()
    T = len(R)
    fig, ax = plt.subplots(figsize=(4.0 + 0.3 * T, 3.2 + 0.3 * T))
    im = ax.imshow(R, vmin=0.0, vmax=1.0, cmap="viridis")
    ticks = range(0, T, max(1, T // 10))
    ax.set_xticks(ticks)
    ax.set_yticks(ticks)
    ax.set_xlabel("evaluated task j")
    ax.set_ylabel("after training task i")
    ax.set_title(title)
    fig.colorbar(im, ax=ax, label="test accuracy R[i, j]")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_comparison(results: list[dict[str, Any]], path: Path, title: str) -> None:
    """Left: ACC and BWT per method. Right: mean accuracy over seen tasks as tasks arrive."""
    plt = _pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    names = [r["method"] for r in results]
    x = np.arange(len(names))
    left.bar(x - 0.2, [r["acc"] for r in results], 0.4, label="ACC")
    left.bar(x + 0.2, [r["bwt"] for r in results], 0.4, label="BWT")
    left.set_xticks(x, names, rotation=30, ha="right")
    left.axhline(0, color="black", linewidth=0.5)
    left.legend()
    for r in results:
        R = np.asarray(r["R"])
        seen = [R[i, : i + 1].mean() for i in range(len(R))]
        right.plot(range(1, len(R) + 1), seen, marker=".", label=r["method"])
    right.set_xlabel("tasks learned")
    right.set_ylabel("mean accuracy on tasks seen so far")
    right.legend(fontsize="small")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
