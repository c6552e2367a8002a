"""The study's own record of its trials: an append-only journal in the study folder.

The driver appends one JSON line per event as Tune reports it -- a trial started (its swept
keys), a result (its metrics at a step), a checkpoint Tune registered, a failure Tune will
retry, its figures, how it ended -- and MLflow is written from these records (recorder.py),
never the other way round. It has the shape of Optuna's JournalStorage: one writer at a time
(an OS file lock held for the driver's life), every record one whole line. The recorder
appends the events of a few seconds at once, each time Tune has saved its experiment state,
and commits them together with a copy of that state (snapshot.py); a resume first cuts the
ledger back to the last commit (`Ledger(path, committed_bytes)`), so the ledger never speaks
of a trial the restored state does not know.
"""
from __future__ import annotations

import fcntl
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ConfigError


@dataclass
class TrialRecord:
    """What the ledger says of one trial (replayed)."""
    trial_id: str
    name: str = ""
    config: dict[str, Any] = field(default_factory=dict)   # the trial's own (swept) keys
    results: list[dict[str, Any]] = field(default_factory=list)
    figures: list[str] = field(default_factory=list)       # paths relative to the study folder
    restored_at: int | None = None
    failures: int = 0                                      # failures Tune retried (the last one too if failed)
    checkpoint_step: int | None = None                     # the last checkpoint Tune registered
    outcome: str | None = None                             # set once it ended
    reason: str | None = None
    stopped_at: int | None = None
    started_at: float | None = None                        # when the driver saw these events (epoch s)
    result_times: list[float | None] = field(default_factory=list)
    ended_at: float | None = None

    @property
    def last_step(self) -> int:
        return max((r["step"] for r in self.results), default=0)


class Ledger:
    """Appends records to `path` under an exclusive lock (released by the kernel if the
    process dies). A second writer is refused with the holder's PID."""

    def __init__(self, path: Path, committed_bytes: int | None = None):
        self.path = Path(path)
        self._at: float | None = None
        self._file = open(self.path, "a+", encoding="utf-8")
        try:
            fcntl.flock(self._file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._file.close()
            raise ConfigError(f"{self.path}: another vqstudy driver is writing this study "
                              f"({_holder(self.path)}); wait for it or stop it") from None
        if committed_bytes is not None:
            _roll_back(self.path, self._file, committed_bytes)
        self._file.seek(0, os.SEEK_END)
        if self._file.tell() and not _ends_with_newline(self.path):
            self._file.write("\n")   # a torn last line from a killed writer: start a new line after it
        self._write({"op": "open", "pid": os.getpid()})
        self.sync()

    def write_at(self, t: float, event: str, *args) -> None:
        """Append `event` (a method of this class) as seen at time `t` (the recorder holds
        events until the next commit; benchmarks read the pace of a study from these times)."""
        self._at = t
        try:
            getattr(self, event)(*args)
        finally:
            self._at = None

    def _write(self, record: dict) -> None:
        record["t"] = round(self._at or time.time(), 3)   # when the driver saw it
        self._file.write(json.dumps(record, separators=(",", ":")) + "\n")

    def sync(self) -> int:
        """Make what was appended survive this process and the machine; returns the ledger's length."""
        self._file.flush()
        os.fsync(self._file.fileno())
        return self._file.tell()

    def started(self, trial_id: str, name: str, config: dict[str, Any]) -> None:
        self._write({"op": "start", "trial": trial_id, "name": name, "config": config})

    def result(self, trial_id: str, metrics: dict[str, Any]) -> None:
        self._write({"op": "result", "trial": trial_id, "metrics": metrics})

    def restored(self, trial_id: str, step: int) -> None:
        self._write({"op": "restored", "trial": trial_id, "step": step})

    def checkpoint(self, trial_id: str, step: int | None) -> None:
        """Tune has registered a checkpoint of the trial (a retry or resume continues from it)."""
        self._write({"op": "checkpoint", "trial": trial_id, "step": step})

    def recovered(self, trial_id: str) -> None:
        """The trial failed and Tune will run it again (from its last checkpoint)."""
        self._write({"op": "recover", "trial": trial_id})

    def figures(self, trial_id: str, paths: list[str]) -> None:
        self._write({"op": "figures", "trial": trial_id, "paths": paths})

    def ended(self, trial_id: str, outcome: str, reason: str | None = None, stopped_at: int | None = None) -> None:
        self._write({"op": "end", "trial": trial_id, "outcome": outcome, "reason": reason,
                     "stopped_at": stopped_at})

    def close(self) -> None:
        self._file.close()


def _roll_back(path: Path, file, committed_bytes: int) -> None:
    """Cut the ledger back to `committed_bytes`; the tail moves to ledger.rolledback-TIME.jsonl
    (what a killed driver recorded after its last commit: work the committed state does not know)."""
    file.seek(0, os.SEEK_END)
    if file.tell() <= committed_bytes:
        return
    file.seek(committed_bytes)
    tail = file.read()
    aside = path.with_name(f"{path.stem}.rolledback-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.jsonl")
    aside.write_text(tail, encoding="utf-8")
    file.truncate(committed_bytes)
    file.flush()
    os.fsync(file.fileno())


def _ends_with_newline(path: Path) -> bool:
    with open(path, "rb") as f:
        f.seek(-1, os.SEEK_END)
        return f.read(1) == b"\n"


def _holder(path: Path) -> str:
    """'pid N, started TIME' of the last driver that opened the ledger (its 'open' record)."""
    for record in reversed(_lines(path)):
        if record.get("op") == "open":
            started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(record.get("t", 0)))
            return f"pid {record.get('pid')}, started {started}"
    return "pid unknown"


def _lines(path: Path) -> list[dict]:
    if not path.exists():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except ValueError:
            continue   # a torn line: the writer was killed while writing it; the record never happened
    return records


def replay(path: Path) -> dict[str, TrialRecord]:
    """Trial id -> what the ledger says of it, in the order trials started."""
    trials: dict[str, TrialRecord] = {}
    for r in _lines(path):
        if "trial" not in r:
            continue
        t = trials.setdefault(r["trial"], TrialRecord(r["trial"]))
        op = r["op"]
        if op == "start":
            t.name, t.config, t.started_at = r["name"], r["config"], r.get("t")
            t.outcome = t.reason = t.stopped_at = None   # a resumed trial runs again
        elif op == "result":
            t.results.append(r["metrics"])
            t.result_times.append(r.get("t"))
        elif op == "restored":
            t.restored_at = r["step"]
        elif op == "recover":
            t.failures += 1
        elif op == "checkpoint":
            t.checkpoint_step = r["step"]
        elif op == "figures":
            t.figures = r["paths"]
        elif op == "end":
            t.outcome, t.reason, t.stopped_at = r["outcome"], r.get("reason"), r.get("stopped_at")
            t.ended_at = r.get("t")
            t.failures += t.outcome == "failed"
    return trials
