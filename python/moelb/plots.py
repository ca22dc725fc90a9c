"""PNG plots of a simulation (``moelb demo`` / ``moelb simulate``). Needs matplotlib, the
``plots`` extra (``pip install "moelb[plots]"``); without it ``plot_simulation`` raises
``PlotsUnavailable``."""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any

import numpy as np

from .io import atomic_write_bytes
from .simulate import SimulationResult

__all__ = ["PlotsUnavailable", "plot_simulation"]


class PlotsUnavailable(ImportError):
    """matplotlib is not installed."""


def _pyplot() -> Any:
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only, never a window
        import matplotlib.pyplot as plt
    except ImportError:
        raise PlotsUnavailable("matplotlib is not installed (pip install 'moelb[plots]')") from None
    return plt


def _save(fig: Any, path: Path) -> Path:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    atomic_write_bytes(path, buffer.getvalue())
    return path


def plot_simulation(
    result: SimulationResult, output_dir: str | os.PathLike[str], focus: str | None = None
) -> list[Path]:
    """Writes into ``output_dir`` (which must exist):

    - ``balancedness_per_layer.png``: predictive balancedness of each placement per MoE layer,
      and the lower bound's;
    - ``rank_load_heatmap.png``: mean load of every GPU in every layer relative to the layer mean,
      trivial placement beside ``focus`` (default: "moelb" if simulated, else the last algorithm);
    - ``balancedness_over_time.png``: per step, the placement in service (rebalances marked).

    Returns the paths written."""
    plt = _pyplot()
    out = Path(output_dir)
    written = []
    names = list(result.algorithms)
    layers = result.layer_ids

    fig, ax = plt.subplots(figsize=(10, 4.2))
    for name in names:
        ax.plot(layers, result.algorithms[name].layer_predictive, marker=".", label=name)
    ax.plot(layers, result.layer_bound_predictive, "k--", linewidth=1, label="lower bound")
    ax.set_xlabel("model layer")
    ax.set_ylabel("balancedness ((mean + 1e-5) / (max + 1e-5) GPU load)")
    ax.set_ylim(0, 1.02)
    ax.set_title(f"Predictive balancedness per layer ({_subtitle(result)})")
    ax.legend(loc="lower right", fontsize="small")
    ax.grid(alpha=0.3)
    written.append(_save(fig, out / "balancedness_per_layer.png"))
    plt.close(fig)

    if focus is None:
        focus = "moelb" if "moelb" in result.algorithms else names[-1]
    panels = ["trivial", focus] if focus != "trivial" else ["trivial"]
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 5), squeeze=False)
    relative = {}
    for name in panels:
        g = result.algorithms[name].rank_load
        mean = g.mean(axis=1, keepdims=True)
        relative[name] = np.divide(g, mean, out=np.ones_like(g), where=mean > 0)
    vmax = max(2.0, max(float(r.max()) for r in relative.values()))
    image = None
    for ax, name in zip(axes[0], panels, strict=True):
        image = ax.imshow(relative[name], aspect="auto", cmap="magma", vmin=0, vmax=vmax)
        ax.set_title(f"{name}: GPU load / layer mean")
        ax.set_xlabel("GPU")
        ax.set_ylabel("simulated MoE layer")
    fig.colorbar(image, ax=axes[0].tolist(), shrink=0.9)
    written.append(_save(fig, out / "rank_load_heatmap.png"))
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(10, 3.8))
    steps = np.arange(result.num_steps)
    for name in names:
        ax.plot(steps, result.algorithms[name].step_balancedness, linewidth=1, label=name)
    period = result.config.rebalance_period
    for boundary in range(period, result.num_steps, period):
        ax.axvline(boundary, color="grey", linewidth=0.5, alpha=0.5)
    ax.set_xlabel("step (grey: rebalances)")
    ax.set_ylabel("balancedness in service")
    ax.set_ylim(0, 1.02)
    ax.set_title("Balancedness of the placement in service")
    ax.legend(loc="lower right", fontsize="small")
    ax.grid(alpha=0.3)
    written.append(_save(fig, out / "balancedness_over_time.png"))
    plt.close(fig)
    return written


def _subtitle(result: SimulationResult) -> str:
    c = result.config
    return f"{c.model}, {c.ep_size} GPUs / {c.num_nodes} nodes, {result.num_physical_experts} slots"
