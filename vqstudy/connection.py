"""Joining a Ray cluster, or starting a local instance: the only place that calls ray.init."""
from __future__ import annotations

import logging
import os

from .errors import ConfigError
from .interrupt import TuneWords

TUNE_WORDS = TuneWords()


def connect(address: str | None) -> bool:
    """Join `address` (or RAY_ADDRESS), else start a local instance sized to this machine,
    listening on loopback only, without a dashboard; True when the instance is this
    process's own (one machine). Reuses an instance this process has.

    Ray 2.60's ray.init turns a node IP of 127.0.0.1 into the machine's public address and
    its servers then listen on every interface. With cluster mode off (Ray's default on
    macOS and Windows laptops, switched by RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, read when
    Ray is imported) the node is 127.0.0.1 and every server binds loopback."""
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")   # vqstudy prints its own progress and table
    # Tune's per-trial result.json/progress.csv/params files on the driver, copied to the
    # storage with its state: the ledger records all of it already.
    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
    logging.getLogger("mlflow").setLevel(logging.WARNING)
    TUNE_WORDS.install()
    address = address or os.environ.get("RAY_ADDRESS")
    if not address:
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    import ray

    if ray.is_initialized():
        return len(ray.nodes()) == 1
    quiet = dict(logging_level=logging.WARNING, log_to_driver=False)
    if not address:
        ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, **quiet)
        return True
    _check_reachable(address)
    try:
        ray.init(address=address, **quiet)
    except (ConnectionError, RuntimeError, ValueError) as e:
        raise ConfigError(f"--address: cannot join the Ray cluster at {address!r}: {str(e).splitlines()[0]}") from None
    return False


def _check_reachable(address: str, timeout_s: float = 10.0) -> None:
    """Ray's own join waits minutes on an address nobody answers: try its port first."""
    import socket

    hostport = address.removeprefix("ray://")
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        return   # "auto" and other forms Ray resolves itself
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except OSError as e:
        reason = e.strerror or type(e).__name__
        raise ConfigError(f"--address: cannot reach the Ray cluster at {address!r} ({reason})") from None


def local_gpus() -> int:
    import torch

    return torch.cuda.device_count()
