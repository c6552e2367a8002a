"""Joining a Ray cluster, or starting a local instance (the only place that calls ray.init),
and what Ray, Tune and MLflow may print on the driver."""
from __future__ import annotations

import logging
import os

from .errors import ConfigError


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
    # ...and when MLflow is first imported (after this), it sets its loggers from this variable:
    # without it, each new store says "Creating initial MLflow database tables" at INFO.
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    DRIVER_LOGS.install()
    # a failed trial's error is Tune's to handle (and the ledger's to record): Ray need not
    # print the worker's traceback again as "unhandled"
    os.environ.setdefault("RAY_IGNORE_UNHANDLED_ERRORS", "1")
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        _check_reachable(address)
    else:
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    import ray

    if ray.is_initialized():
        return len(ray.nodes()) == 1
    quiet = dict(logging_level=logging.WARNING, log_to_driver=False)
    if not address:
        ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, **quiet)
        return True
    try:
        ray.init(address=address, **quiet)
    except (ConnectionError, RuntimeError, ValueError) as e:
        raise ConfigError(f"--address: cannot join the Ray cluster at {address!r}: {str(e).splitlines()[0]}") from None
    return False


def unanswered(address: str, timeout_s: float) -> str | None:
    """Why nothing answers on host:port within `timeout_s` (a TCP connect), or None if
    something does or the address is not host:port ("auto" and forms Ray resolves itself)."""
    import socket

    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        return None
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
        return None
    except OSError as e:
        return e.strerror or type(e).__name__


def _check_reachable(address: str, timeout_s: float = 10.0) -> None:
    """Ray's own join waits minutes on an address nobody answers: try its port first."""
    reason = unanswered(address, timeout_s)
    if reason:
        raise ConfigError(f"--address: cannot reach the Ray cluster at {address!r} ({reason})")


def gcs_address() -> str | None:
    """host:port of the connected cluster's GCS (what the driver's watch probes)."""
    import ray

    try:
        return ray.get_runtime_context().gcs_address
    except Exception:
        return None


class DriverLogs:
    """A logging filter on the driver: drops what Tune tells a user of Tune where vqstudy says
    it itself -- at a stop signal (how to stop, `Tuner.restore(...)`, "Trials did not
    complete": the driver names `vqstudy resume DIR`), that trials have no result.json (the
    ledger has their results; Tune's per-trial files are off) -- and turns a logged error with
    a traceback (a trial's failure, a database error of MLflow's) into one line ending with
    its root cause: the trial's reason is recorded with the trial, the store's is said again
    where the driver gives up."""
    DROPPED = ("Stop signal received", "Experiment has been interrupted", "Trials did not complete",
               "Failed to fetch metrics")
    LOGGERS = ("ray.tune.tune", "ray.tune.analysis.experiment_analysis", "ray.tune.execution.tune_controller",
               "mlflow.store.db.utils")

    def filter(self, record) -> bool:
        message = str(record.msg)
        if record.exc_info and record.exc_info[1] is not None:
            first = record.getMessage().strip().splitlines()[0]
            record.msg = f"{first} {root_cause(record.exc_info[1])[:300]}"
            record.args, record.exc_info, record.exc_text = None, None, None
        return not message.startswith(self.DROPPED)

    def install(self) -> None:
        for name in self.LOGGERS:
            logging.getLogger(name).addFilter(self)   # once: adding the same filter again is a no-op


def root_cause(error: BaseException) -> str:
    """The last line of the innermost exception behind `error` (SQLAlchemy and MLflow wrap
    the database's own words, e.g. "database or disk is full"; Ray's RayTaskError keeps the
    exception a trial raised as `cause`)."""
    while True:
        inner = getattr(error, "orig", None) or getattr(error, "cause", None) or error.__cause__ or error.__context__
        if inner is None or inner is error:
            break
        error = inner
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[-1] if text else ''}"


DRIVER_LOGS = DriverLogs()
