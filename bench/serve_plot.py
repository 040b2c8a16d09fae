"""Figures of `tsukimi bench serve` (PNG files): TTFT/TBT CDFs of a run, effective capacity against request rate."""

from __future__ import annotations

import os

import numpy as np

from tsukimi.sim.serve_plot import plot_cdfs


def write_cdfs(ttft: np.ndarray, tbt: np.ndarray, ttft_slo_s: float, tbt_slo_s: float, title: str, plot_dir: str,
               name: str = "ttft_tbt_cdf.png") -> str:
    """TTFT and TBT CDFs over all scheduled requests (rejected and failed ones never reach the top)."""
    os.makedirs(plot_dir, exist_ok=True)
    path = os.path.join(plot_dir, name)
    plot_cdfs(ttft, tbt, ttft_slo_s, tbt_slo_s, title, path)
    return path


def write_capacity(points: list[tuple[float, float]], target: float, title: str, plot_dir: str,
                   name: str = "capacity_vs_rate.png") -> str:
    """Effective request capacity at each measured request rate (req/s), with the target line."""
    os.makedirs(plot_dir, exist_ok=True)
    path = os.path.join(plot_dir, name)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    pts = sorted(points)
    ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o")
    ax.axhline(target, linestyle="--", color="red", label=f"target {target:g}")
    if pts and pts[-1][0] > 4 * max(pts[0][0], 1e-9):
        ax.set_xscale("log")
    ax.set_xlabel("offered request rate (req/s)")
    ax.set_ylabel("effective request capacity")
    ax.set_ylim(0, 1.02)
    ax.grid(True, alpha=0.3)
    ax.legend(loc="lower left")
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
