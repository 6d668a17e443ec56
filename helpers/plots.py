"""Small plotting helpers shared by the chapters (image grids)."""
from __future__ import annotations

from typing import Sequence

import torch


def show_images(images: torch.Tensor, nrow: int = 8, titles: Sequence[str] | None = None, ax=None,
                scale: float = 0.9, row_labels: Sequence[str] | None = None):
    """Show ``(n, 3, H, W)`` images in [0, 1] as a grid with optional per-image titles."""
    import matplotlib.pyplot as plt

    n = len(images)
    ncol = min(nrow, n)
    nr = (n + ncol - 1) // ncol
    fig, axes = plt.subplots(nr, ncol, figsize=(scale * ncol, scale * nr * (1.25 if titles else 1.0)),
                             squeeze=False, layout="constrained")
    for i, ax_ in enumerate(axes.flat):
        ax_.axis("off")
        if i < n:
            ax_.imshow(images[i].permute(1, 2, 0).clamp(0, 1).numpy(), interpolation="nearest")
            if titles is not None:
                ax_.set_title(titles[i], fontsize=7)
    if row_labels is not None:
        for r, lab in enumerate(row_labels[:nr]):
            axes[r, 0].axis("on")
            axes[r, 0].set_xticks([])
            axes[r, 0].set_yticks([])
            for s in axes[r, 0].spines.values():
                s.set_visible(False)
            axes[r, 0].set_ylabel(lab, rotation=0, ha="right", va="center", fontsize=8)
    return fig
