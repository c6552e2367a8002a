"""Per-trial figures logged to the trial's MLflow run: the code-usage histogram (how
collapse looks: a few tall bars, a long flat tail of dead codes) and, for image data, a
grid of eval images over their reconstructions.
"""
from __future__ import annotations

from pathlib import Path

import torch

from .config import TrialConfig
from .data import to_float
from .train import eval_pass, restore_model

GRID_IMAGES = 8


def _figure(width: float, height: float):
    """A bare matplotlib Figure (no pyplot state: cheaper, and safe in worker threads)."""
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=100)


def usage_histogram(counts: torch.Tensor, path: Path, title: str) -> Path:
    """Codes sorted by use, on a log axis: the shape of the usage distribution at any K."""
    from matplotlib.ticker import FuncFormatter, NullLocator

    k = counts.numel()
    sorted_counts = counts.sort(descending=True).values.double().cpu().numpy()
    used = int((counts > 0).sum())
    fig = _figure(6, 3.2)
    ax = fig.add_axes((0.12, 0.16, 0.84, 0.68))
    ax.plot(range(k), sorted_counts, drawstyle="steps-post", color="tab:blue", lw=1.5)  # a line: no patch limits
    ax.set_ylim(0, max(1.0, float(sorted_counts[0])) * 1.5)
    ax.set_yscale("symlog", linthresh=1)
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))  # plain text: no mathtext layout
    ax.yaxis.set_minor_locator(NullLocator())
    ax.set_xlim(0, k)
    ax.set_xlabel("code rank (most used first)")
    ax.set_ylabel("assignments on the eval set")
    ax.set_title(f"{title}\n{used:,} of {k:,} codes used ({used / k:.1%})", fontsize=9)
    fig.savefig(path)
    return path


@torch.no_grad()
def reconstruction_grid(model, x: torch.Tensor, path: Path, title: str) -> Path:
    """Top row: eval images; bottom row: their reconstructions."""
    x_hat = model.decode(model.quantizer(model.encode(x)).z_q).clamp(0, 1)
    n = x.shape[0]
    fig = _figure(1.1 * n, 2.6)
    axes = fig.subplots(2, n, squeeze=False)
    for row, images in enumerate((x, x_hat)):
        for i in range(n):
            img = images[i].permute(1, 2, 0).cpu().numpy()
            axes[row][i].imshow(img.squeeze(-1) if img.shape[-1] == 1 else img, cmap="gray", vmin=0, vmax=1)
            axes[row][i].axis("off")
    axes[0][0].set_title("input", fontsize=8, loc="left")
    axes[1][0].set_title("reconstruction", fontsize=8, loc="left")
    fig.suptitle(title, fontsize=9)
    fig.savefig(path)
    return path


def trial_figures(cfg: TrialConfig, checkpoint_dir: str | Path, out_dir: str | Path) -> list[Path]:
    """Write the figures of a finished trial from its final checkpoint; returns their paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model, data, device = restore_model(cfg, checkpoint_dir)
    title = f"{cfg.quantizer.name}, K={cfg.quantizer.codebook_size:,}, D={cfg.model.latent_dim}"
    counts = eval_pass(model, data, cfg, device).counts
    paths = [usage_histogram(counts, out_dir / "code_usage.png", title)]
    if data.kind == "image":
        x = to_float(data.eval[:GRID_IMAGES]).to(device)
        paths.append(reconstruction_grid(model, x, out_dir / "reconstructions.png", title))
    return paths
