"""Per-trial figures logged to the trial's MLflow run: the code-usage histogram (how
collapse looks: a few tall bars, a long flat tail of dead codes) and the figures the
data's modality adds (images: a grid of eval images over their reconstructions).

They are drawn from what train() holds when it ends (`Trained`), so no model is rebuilt
and no dataset loaded a second time. `new_figure` is the one figure factory of the
project (analysis plots use it too): a bare matplotlib Figure, without pyplot's global
state, which is cheaper and safe in worker threads. No torch import at module level.
"""
from __future__ import annotations

from pathlib import Path

from .modalities import MODALITIES
from .registry import load

GRID_IMAGES = 8


def new_figure(width: float, height: float, *, dpi: int = 100, layout: str | None = None):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=dpi, layout=layout)


def usage_histogram(counts, path: Path, title: str) -> Path:
    """Codes sorted by use, on a log axis: the shape of the usage distribution at any K."""
    from matplotlib.ticker import FuncFormatter, NullLocator

    k = counts.numel()
    sorted_counts = counts.sort(descending=True).values.double().cpu().numpy()
    used = int((counts > 0).sum())
    fig = new_figure(6, 3.2)
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


def reconstruction_grid(trained, out_dir: Path, title: str) -> Path:
    """Top row: eval images; bottom row: their reconstructions."""
    import torch

    from .data import to_float

    model = trained.model.eval()
    x = to_float(trained.data.eval[:GRID_IMAGES]).to(trained.device)   # (n, C, H, W)
    with torch.no_grad():
        x_hat = model.decode(model.quantizer(model.encode(x)).z_q).clamp(0, 1)
    n = x.shape[0]
    fig = new_figure(1.1 * n, 2.6)
    axes = fig.subplots(2, n, squeeze=False)
    for row, images in enumerate((x, x_hat)):
        for i in range(n):
            img = images[i].permute(1, 2, 0).cpu().numpy()
            axes[row][i].imshow(img.squeeze(-1) if img.shape[-1] == 1 else img, cmap="gray", vmin=0, vmax=1)
            axes[row][i].axis("off")
    axes[0][0].set_title("input", fontsize=8, loc="left")
    axes[1][0].set_title("reconstruction", fontsize=8, loc="left")
    fig.suptitle(title, fontsize=9)
    path = out_dir / "reconstructions.png"
    fig.savefig(path)
    return path


def trial_figures(trained, out_dir: str | Path) -> list[Path]:
    """Write the figures of a finished trial (`train.Trained`); returns their paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cfg = trained.cfg
    title = f"{cfg.quantizer.name}, K={cfg.quantizer.codebook_size:,}, D={cfg.model.latent_dim}"
    paths = [usage_histogram(trained.counts, out_dir / "code_usage.png", title)]
    paths += [load(figure)(trained, out_dir, title) for figure in MODALITIES[trained.data.modality].figures]
    return paths
