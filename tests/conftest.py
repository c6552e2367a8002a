"""Shared fixtures: tiny configs and datasets written in torchvision's on-disk formats."""
from __future__ import annotations

import hashlib
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from vqstudy.config import TrialConfig

torch.set_num_threads(2)


def tiny_config(**flat) -> TrialConfig:
    """A trial that trains in well under a second on a CPU core."""
    base = {
        "data.num_train": 256, "data.num_eval": 128, "data.dim": 8, "data.num_components": 16,
        "model.latent_dim": 4, "model.encoder_width": 16, "model.decoder_width": 16,
        "quantizer.codebook_size": 32, "train.steps": 20, "train.batch_size": 32,
        "train.eval_every": 10, "train.eval_batch_size": 64, "train.device": "cpu",
    }
    return TrialConfig.from_dict({**base, **flat})


def write_idx(path: Path, array: np.ndarray) -> None:
    """MNIST's IDX format: zero, zero, type code 0x08 (ubyte), ndim; big-endian int32 sizes; data."""
    path.parent.mkdir(parents=True, exist_ok=True)
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}i", *array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


@pytest.fixture
def mnist_root(tmp_path):
    """MNIST and FashionMNIST raw files (12 train / 5 test 28x28 images); returns (root, train images)."""
    rng = np.random.default_rng(0)
    train = rng.integers(0, 256, (12, 28, 28), dtype=np.uint8)
    test = rng.integers(0, 256, (5, 28, 28), dtype=np.uint8)
    for folder in ("MNIST", "FashionMNIST"):
        raw = tmp_path / folder / "raw"
        write_idx(raw / "train-images-idx3-ubyte", train)
        write_idx(raw / "train-labels-idx1-ubyte", rng.integers(0, 10, 12))
        write_idx(raw / "t10k-images-idx3-ubyte", test)
        write_idx(raw / "t10k-labels-idx1-ubyte", rng.integers(0, 10, 5))
    return tmp_path, train


@pytest.fixture
def cifar_root(tmp_path, monkeypatch):
    """CIFAR-10 python pickles (5 train batches of 4, one test batch of 3). torchvision checks
    each file's MD5 against the release's; the expected MD5s are set to our files' own."""
    from torchvision.datasets import CIFAR10

    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(1)
    md5 = lambda p: hashlib.md5(p.read_bytes()).hexdigest()  # noqa: E731

    def dump(name, obj):
        (folder / name).write_bytes(pickle.dumps(obj))
        return [name, md5(folder / name)]

    images = []
    train_list = []
    for i in range(1, 6):
        batch = rng.integers(0, 256, (4, 3 * 32 * 32), dtype=np.uint8)
        images.append(batch)
        train_list.append(dump(f"data_batch_{i}", {"data": batch, "labels": list(range(4))}))
    test_list = [dump("test_batch", {"data": rng.integers(0, 256, (3, 3072), dtype=np.uint8), "labels": [0, 1, 2]})]
    meta = dump("batches.meta", {"label_names": [f"c{i}" for i in range(10)]})
    monkeypatch.setattr(CIFAR10, "train_list", train_list)
    monkeypatch.setattr(CIFAR10, "test_list", test_list)
    monkeypatch.setattr(CIFAR10, "meta", {"filename": meta[0], "key": "label_names", "md5": meta[1]})
    return tmp_path, np.concatenate(images).reshape(-1, 3, 32, 32)


@pytest.fixture(scope="session")
def ray_address():
    """One local Ray instance for the whole test session (2 CPUs, loopback, no dashboard).
    In-process studies reuse it; subprocess drivers join it with --address."""
    import logging
    import os

    os.environ["RAY_AUTH_MODE"] = "disabled"            # a throwaway local test instance only
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # loopback only, as driver.connect does
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    import ray

    ctx = ray.init(address="local", num_cpus=2, include_dashboard=False,
                   logging_level=logging.WARNING, log_to_driver=False)
    yield ctx.address_info["address"]
    ray.shutdown()


def tiny_study(tmp_path, name: str = "tiny", **sections) -> Path:
    """A study file of tiny trials (30 steps, 3 evaluations each); sections override/extend."""
    import yaml

    study = {
        "name": name,
        "description": "test study",
        "base": {"data": {"num_train": 512, "num_eval": 256, "dim": 8, "num_components": 16},
                 "model": {"latent_dim": 4, "encoder_width": 16, "decoder_width": 16},
                 "quantizer": {"codebook_size": 16},
                 "train": {"steps": 30, "eval_every": 10, "batch_size": 64, "eval_batch_size": 256, "device": "cpu"}},
        "sweep": {"grid": {"quantizer.name": ["vq", "simvq"]}},
        "resources": {"cpu": 1},
        "tracking": {"artifacts": False},
    }
    for key, value in sections.items():
        study[key] = {**study.get(key, {}), **value} if isinstance(value, dict) else value
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(study))
    return path


def error_line(stderr: str) -> str:
    """The one line of a refused command's stderr; a `vqstudy run` may say first what it starts
    ('NAME: N trials into DIR; starting Ray...' or '...; joining the Ray cluster at ADDR...')."""
    lines = stderr.strip().splitlines()
    if len(lines) == 2 and " trials into " in lines[0] and lines[0].endswith("..."):
        lines = lines[1:]
    assert len(lines) == 1 and lines[0].startswith("vqstudy: error: "), stderr[-2000:]
    return lines[0]
