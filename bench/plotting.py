"""What every benchmark plot shares: a non-interactive backend, grid, legend, one PNG file."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)


def figure(ncols: int = 1, figsize: tuple[float, float] = (6, 4)):
    """(fig, axes): one axis, or a list of `ncols` axes side by side."""
    return plt.subplots(1, ncols, figsize=figsize)


def save(fig, axes, path: Path, legend_size: int = 8) -> Path:
    """Grid and legend (where something is labelled) on every axis; write `path` as PNG."""
    for ax in axes if isinstance(axes, (list, tuple)) or hasattr(axes, "flat") else [axes]:
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=legend_size)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
