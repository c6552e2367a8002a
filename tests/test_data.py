"""Datasets: synthetic ones deterministic in the seed; real ones read through torchvision's
own classes from files written here in torchvision's on-disk formats (nothing downloads)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from vqstudy.config import ConfigError, DataConfig
from vqstudy.data import DATASETS, load_dataset, to_float


@pytest.mark.parametrize("name, shape", [("gaussian_mixture", (16,)), ("shapes", (3, 32, 32)), ("digits", (1, 8, 8))])
def test_offline_datasets_are_deterministic(name, shape):
    """Same seed, same data; another seed, other data (synthetic) or another split (digits)."""
    cfg = DataConfig(name=name, num_train=64, num_eval=32)
    a, b = load_dataset(cfg), load_dataset(cfg)
    c = load_dataset(DataConfig(name=name, num_train=64, num_eval=32, seed=1))
    assert a.example_shape == shape and len(a.train) == 64 and len(a.eval) == 32
    assert torch.equal(a.train, b.train) and torch.equal(a.eval, b.eval)
    assert not torch.equal(a.train, c.train)


def test_gaussian_mixture_has_the_configured_clusters():
    """With a small spread, the points fall into exactly C tight, well-separated groups."""
    data = load_dataset(DataConfig(name="gaussian_mixture", dim=4, num_components=5, spread=0.01, num_train=500))
    left, groups = data.train, 0
    while len(left):                       # peel off everything within 0.1 of the first point
        near = (left - left[0]).norm(dim=1) < 0.1
        left, groups = left[~near], groups + 1
    assert groups == 5


def test_shapes_are_images_with_shapes():
    """shapes: uint8 colour images whose pixels are not all background."""
    data = load_dataset(DataConfig(name="shapes", num_train=16, num_eval=4, image_size=16))
    assert data.train.dtype == torch.uint8 and data.example_shape == (3, 16, 16)
    colours_per_image = [len(img.reshape(3, -1).t().unique(dim=0)) for img in data.train]
    assert min(colours_per_image) >= 2
    assert 0 <= to_float(data.train).min() and to_float(data.train).max() <= 1


def test_digits_default_split():
    """digits: all 1,797 images, 20% held out for eval."""
    data = load_dataset(DataConfig(name="digits"))
    assert len(data.train) + len(data.eval) == 1797 and len(data.eval) == 359


@pytest.mark.parametrize("name", ["mnist", "fashion_mnist"])
def test_mnist_family_from_idx_files(name, mnist_root):
    """MNIST/FashionMNIST: torchvision reads our IDX files; pixels arrive unchanged."""
    root, train = mnist_root
    data = load_dataset(DataConfig(name=name, root=str(root)))
    assert data.example_shape == (1, 28, 28) and len(data.train) == 12 and len(data.eval) == 5
    written = {img.tobytes() for img in train}
    assert {img.numpy().tobytes() for img in data.train[:, 0]} == written


def test_cifar10_from_pickled_batches(cifar_root):
    """CIFAR-10: torchvision reads our pickled batches (after its MD5 check); channels first."""
    root, train = cifar_root
    data = load_dataset(DataConfig(name="cifar10", root=str(root), num_train=10))
    assert data.example_shape == (3, 32, 32) and len(data.train) == 10 and len(data.eval) == 3
    written = {img.tobytes() for img in train}
    assert all(img.numpy().tobytes() in written for img in data.train)


def test_imagefolder(tmp_path):
    """imagefolder: class folders of PNGs of any size, resized to image_size, 10% to eval."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for cls in ("cats", "dogs"):
        (tmp_path / cls).mkdir()
        for i in range(10):
            Image.fromarray(rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)).save(tmp_path / cls / f"{i}.png")
    data = load_dataset(DataConfig(name="imagefolder", root=str(tmp_path), image_size=16))
    assert data.example_shape == (3, 16, 16) and len(data.train) == 18 and len(data.eval) == 2


@pytest.mark.parametrize("name", ["mnist", "fashion_mnist", "cifar10", "imagefolder"])
def test_missing_files_are_a_config_error(name, tmp_path):
    """A dataset missing from data.root is a ConfigError naming data.root (no download in tests)."""
    with pytest.raises(ConfigError, match="data.root"):
        load_dataset(DataConfig(name=name, root=str(tmp_path / "empty")))


def test_registry_is_what_the_design_names():
    """The seven datasets of the design are registered."""
    assert list(DATASETS) == ["gaussian_mixture", "shapes", "digits", "mnist", "fashion_mnist", "cifar10", "imagefolder"]
