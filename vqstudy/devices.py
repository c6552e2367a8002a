"""Which torch device a trial trains on, in which precision, and a one-line refusal when the
device asked for is not there.

`train.device: auto` is CUDA when the process sees a GPU, else the CPU. Inside a Ray trial
that is "when the trial was given one": Ray sets CUDA_VISIBLE_DEVICES to the GPUs a trial
holds (one GPU shared by the trials packed on it, for `resources.gpu` below 1), and the
trainable turns `auto` into `cpu` for a trial given none (trainable.py).

`train.precision: bf16` runs the encoder and decoder under autocast; the quantizer always
runs in float32 (models.VQAutoencoder.quantize): bf16 keeps 8 bits of mantissa, so the
distances that pick a code at large K (which differ in their low bits) and the small
moving-average updates of EMA codebooks and code-usage counts would be rounded away.
"""
from __future__ import annotations

import contextlib

import torch

from .errors import ConfigError

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16}


def local_gpus() -> int:
    return torch.cuda.device_count()


def describe_gpus() -> str:
    """What this machine has, in words: '2 CUDA devices' / 'no CUDA device (...)'."""
    count = local_gpus()
    if count:
        return f"{count} CUDA device{'s' if count > 1 else ''}"
    if torch.version.cuda is None:
        return f"no CUDA device (torch {torch.__version__} is a CPU-only build)"
    return f"no CUDA device (torch {torch.__version__} finds none)"


def resolve(name: str, source: str = "train.device") -> torch.device:
    """The device `name` means on this machine; ConfigError when it is not there."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda"):
        index = int(name.partition(":")[2] or 0)
        if index >= torch.cuda.device_count():
            raise ConfigError(f"{source}: {name} asked but this machine has {describe_gpus()}")
    if name == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"{source}: mps asked but this machine has no Apple GPU (mps) device")
    return torch.device(name)


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """The autocast context of `train.precision` (a no-op context for fp32)."""
    dtype = PRECISIONS[precision]
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (before reading a clock; CUDA runs asynchronously)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
