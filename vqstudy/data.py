"""Datasets (named in vqstudy/registry.py): two synthetic ones generated from `data.seed`, sklearn's bundled
digits, and torchvision's MNIST, FashionMNIST, CIFAR-10 and ImageFolder.

A builder returns (train, eval) tensors; `load_dataset` adds the modality its registry
entry names. Everything is loaded once into memory as tensors (images as uint8, to keep CIFAR-10 at
150 MB), split into train and eval deterministically; `to_float` maps a batch to [0, 1].
The scale of these studies is small models on many configurations, so in-memory
tensors with random-index batches beat a DataLoader's worker processes.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from .config import DataConfig
from .errors import ConfigError
from .registry import DATASETS

SYNTHETIC_TRAIN, SYNTHETIC_EVAL = 8192, 2048
Split = tuple[Tensor, Tensor]   # what a registered builder returns: (train, eval) examples


@dataclass
class Dataset:
    train: Tensor   # (N, C, H, W) uint8 images or (N, n) float vectors
    eval: Tensor
    modality: str   # a key of modalities.MODALITIES, as the dataset's registry entry says

    @property
    def example_shape(self) -> tuple[int, ...]:
        return tuple(self.train.shape[1:])


def to_float(x: Tensor) -> Tensor:
    """uint8 images -> [0, 1] floats; vectors pass through."""
    return x.float() / 255 if x.dtype == torch.uint8 else x.float()


def _generator(cfg: DataConfig, salt: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(cfg.seed * 1_000_003 + salt)


def _split(x: Tensor, cfg: DataConfig, eval_fraction: float) -> tuple[Tensor, Tensor]:
    """Seeded shuffle, then the first part for eval, honouring num_train / num_eval caps."""
    x = x[torch.randperm(len(x), generator=_generator(cfg, 1))]
    n_eval = cfg.num_eval or max(1, int(len(x) * eval_fraction))
    return _cap(x[n_eval:], cfg.num_train), x[:n_eval]


def _cap(x: Tensor, n: int | None) -> Tensor:
    return x if n is None else x[:n]


def _sizes(cfg: DataConfig) -> tuple[int, int]:
    return cfg.num_train or SYNTHETIC_TRAIN, cfg.num_eval or SYNTHETIC_EVAL


# -- synthetic ------------------------------------------------------------------------
def gaussian_mixture(cfg: DataConfig) -> Split:
    """Vectors from C Gaussians in R^n: centres ~ N(0, I), each point centre + spread * N(0, I).
    The synthetic setting of the collapse papers: the data has C clusters, so K >> C codes
    can only all be used if the encoder spreads its outputs."""
    g = _generator(cfg)
    centres = torch.randn(cfg.num_components, cfg.dim, generator=g)      # (C, n)

    def sample(n: int) -> Tensor:
        comp = torch.randint(0, cfg.num_components, (n,), generator=g)
        return centres[comp] + cfg.spread * torch.randn(n, cfg.dim, generator=g)  # (n, dim)

    n_train, n_eval = _sizes(cfg)
    return sample(n_train), sample(n_eval)


def _draw_shapes(n: int, size: int, g: torch.Generator) -> Tensor:
    """n RGB images of one or two random circles, squares or triangles on a dark background."""
    grid = torch.arange(size, dtype=torch.float32) + 0.5
    yy, xx = torch.meshgrid(grid, grid, indexing="ij")                   # (S, S)
    img = (0.4 * torch.rand(n, 3, 1, 1, generator=g)).expand(n, 3, size, size).clone()
    for slot in range(2):
        kind = torch.randint(0, 3, (n, 1, 1), generator=g)
        cx, cy = (size * torch.rand(2, n, 1, 1, generator=g)).unbind(0)
        r = size * (0.12 + 0.2 * torch.rand(n, 1, 1, generator=g))
        colour = torch.rand(n, 3, 1, 1, generator=g)
        dx, dy = xx - cx, yy - cy                                        # (n, S, S)
        circle = dx**2 + dy**2 <= r**2
        square = (dx.abs() <= 0.8 * r) & (dy.abs() <= 0.8 * r)
        triangle = (dy.abs() <= 0.8 * r) & (dx.abs() <= (dy + 0.8 * r) / 2)
        mask = torch.where(kind == 0, circle, torch.where(kind == 1, square, triangle))
        if slot:  # the second shape appears in half the images
            mask &= torch.rand(n, 1, 1, generator=g) < 0.5
        img = torch.where(mask[:, None], colour, img)
    return (img * 255).round().to(torch.uint8)                           # (n, 3, S, S)


def shapes(cfg: DataConfig) -> Split:
    """Procedural colour images of random shapes, generated from the seed (no files)."""
    g = _generator(cfg)
    n_train, n_eval = _sizes(cfg)
    return _draw_shapes(n_train, cfg.image_size, g), _draw_shapes(n_eval, cfg.image_size, g)


# -- real data ---------------------------------------------------------------------------
def digits(cfg: DataConfig) -> Split:
    """The 1,797 8x8 handwritten digits scikit-learn ships (values 0..16): real data, no download."""
    from sklearn.datasets import load_digits

    x = torch.from_numpy(load_digits().images).float()                   # (1797, 8, 8)
    x = (x * (255 / 16)).round().to(torch.uint8)[:, None]                # (1797, 1, 8, 8)
    return _split(x, cfg, eval_fraction=0.2)


def _torchvision(cls_name: str, cfg: DataConfig, train: bool):
    import torchvision.datasets as tvd

    try:
        return getattr(tvd, cls_name)(cfg.root, train=train, download=cfg.download)
    except RuntimeError as e:  # torchvision: "Dataset not found or corrupted. ..."
        hint = "" if cfg.download else " (set data.download: true to fetch it)"
        raise ConfigError(f"data.root: {cls_name} not found under {cfg.root!r}{hint}: "
                          f"{str(e).splitlines()[0]}") from None


def _as_images(data) -> Tensor:
    """torchvision `.data` -> (N, C, H, W) uint8: MNIST gives (N, H, W) tensors, CIFAR (N, H, W, C) arrays."""
    x = torch.as_tensor(data)
    return x[:, None] if x.ndim == 3 else x.permute(0, 3, 1, 2).contiguous()


def _torchvision_dataset(cls_name: str) -> Callable[[DataConfig], Split]:
    def build(cfg: DataConfig) -> Split:
        x_train = _as_images(_torchvision(cls_name, cfg, train=True).data)
        x_eval = _as_images(_torchvision(cls_name, cfg, train=False).data)
        g = _generator(cfg, 2)  # num_train / num_eval take seeded random subsets
        x_train = x_train[torch.randperm(len(x_train), generator=g)]
        x_eval = x_eval[torch.randperm(len(x_eval), generator=g)]
        return _cap(x_train, cfg.num_train), _cap(x_eval, cfg.num_eval)

    build.__doc__ = f"torchvision.datasets.{cls_name} under data.root (train and test splits)."
    return build


def imagefolder(cfg: DataConfig) -> Split:
    """Any folder of class sub-folders of images (torchvision ImageFolder), resized and
    centre-cropped to data.image_size; 10% held out for eval unless data.num_eval is set."""
    import torchvision.datasets as tvd
    import torchvision.transforms as T

    transform = T.Compose([T.Resize(cfg.image_size), T.CenterCrop(cfg.image_size), T.PILToTensor()])
    try:
        folder = tvd.ImageFolder(cfg.root, transform=transform)
    except (FileNotFoundError, OSError) as e:
        raise ConfigError(f"data.root: no image folder at {cfg.root!r}: {str(e).splitlines()[0]}") from None
    x = torch.stack([folder[i][0] for i in range(len(folder))])          # (N, 3, S, S) uint8
    if len(x) < 2:
        raise ConfigError(f"data.root: {cfg.root!r} holds {len(x)} image(s); need at least 2 to split")
    return _split(x, cfg, eval_fraction=0.1)


mnist = _torchvision_dataset("MNIST")
fashion_mnist = _torchvision_dataset("FashionMNIST")
cifar10 = _torchvision_dataset("CIFAR10")


def load_dataset(cfg: DataConfig) -> Dataset:
    """The dataset `cfg` names, as (train, eval) tensors with the modality its registry entry gives."""
    if cfg.name not in DATASETS:
        raise ConfigError(f"data.name: {cfg.name!r} is not one of {', '.join(DATASETS)}")
    return Dataset(*DATASETS[cfg.name](cfg), DATASETS.entry(cfg.name).modality)
