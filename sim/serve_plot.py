"""Figures of `tsukimi sim serve` (matplotlib, Agg backend: PNG files, no display)."""

from __future__ import annotations

import numpy as np


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _cdf(ax, values: np.ndarray, n_total: int, label: str | None = None) -> None:
    finite = np.sort(values[np.isfinite(values)])
    if not len(finite):
        return
    ax.step(finite, np.arange(1, len(finite) + 1) / n_total, where="post", label=label)


def plot_cdfs(ttft: np.ndarray, tbt: np.ndarray, ttft_slo_s: float, tbt_slo_s: float, title: str,
              path: str) -> None:
    """TTFT and TBT distributions (share of all requests; rejected ones never reach the top)."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, values, slo, name in ((axes[0], ttft, ttft_slo_s, "TTFT (s)"), (axes[1], tbt, tbt_slo_s, "TBT (s)")):
        _cdf(ax, values, len(values))
        ax.axvline(slo, linestyle="--", color="red", label=f"SLO {slo:g} s")
        ax.set_xlabel(name)
        ax.set_ylabel("share of all requests")
        ax.set_ylim(0, 1.02)
        ax.grid(True, alpha=0.3)
        ax.legend(loc="lower right")
    axes[0].set_xscale("symlog", linthresh=1.0)
    axes[0].set_xlim(left=0)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _load_axes(ax, samples: list[tuple], colocated: bool, title: str) -> None:
    if not samples:
        return
    rows = np.array(samples, dtype=float)
    t = rows[:, 0]
    ax.plot(t, rows[:, 1], label="waiting for prefill" if colocated else "prefill pool: queued or running",
            color="tab:blue", linewidth=0.8)
    ax.plot(t, rows[:, 2], label="decode batch (all instances)" if colocated else "decode pool: batch",
            color="tab:orange", linewidth=0.8)
    if not colocated and rows[:, 3].any():
        ax.plot(t, rows[:, 3], label="decode pool: KV in, not yet batched", color="tab:red", linewidth=0.8)
    ax.set_ylabel("requests")
    ax.set_title(title, fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(loc="upper right", fontsize=8)


def plot_load(samples: list[tuple], colocated: bool, title: str, path: str) -> None:
    """Load of each pool over time."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(10, 4))
    _load_axes(ax, samples, colocated, title)
    ax.set_xlabel("simulated time (s)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_load_panels(runs: dict[str, list[tuple]], title: str, path: str) -> None:
    """One load-over-time panel per run (shared axes), e.g. per rejection mode."""
    plt = _pyplot()
    fig, axes = plt.subplots(len(runs), 1, figsize=(10, 2.8 * len(runs)), sharex=True, sharey=True, squeeze=False)
    for ax, (label, samples) in zip(axes[:, 0], runs.items()):
        _load_axes(ax, samples, False, label)
    axes[-1, 0].set_xlabel("simulated time (s)")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_capacity(curves: dict[str, list[tuple[float, float]]], ttft_slo_s: float, title: str, path: str) -> None:
    """Effective request capacity against the TBT threshold, one line per system."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, curve in curves.items():
        ax.plot([c[0] for c in curve], [c[1] for c in curve], marker=".", label=label)
    for x in (0.1, 0.2, 0.3):
        ax.axvline(x, color="gray", linestyle=":", linewidth=0.8)
    ax.set_xlabel("TBT threshold (s)")
    ax.set_ylabel(f"effective request capacity (TTFT <= {ttft_slo_s:g} s)")
    ax.set_ylim(0, 1.02)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_bars(values: dict[str, float], ylabel: str, title: str, path: str) -> None:
    """One bar per run (e.g. average TTFT per placement policy)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    labels = list(values)
    bars = ax.bar(labels, [values[k] for k in labels], color="tab:blue")
    for bar, label in zip(bars, labels):
        ax.annotate(f"{values[label]:.2f}", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                    ha="center", va="bottom", fontsize=9)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(True, axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
