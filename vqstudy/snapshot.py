"""The study's committed copy of Ray Tune's experiment state, and the commit that pairs it
with the ledger.

Tune writes its experiment state (trials, their checkpoints, the searcher's state) in
place, into a staging folder on the driver, and copies that folder to the storage a few
seconds later, also in place: a driver killed during either write leaves a state that is
cut short, or one that is older than what the driver already recorded. Neither may decide
what a resume does. So vqstudy commits both records together, each time Tune has saved its
state (Tune then asks its callbacks for their state: `Recorder.get_state`):

    1. the events since the last commit are appended to the ledger (flushed, fsynced);
    2. Tune's staging files are copied into DIR/ray-state/gNNNNNN/ (fsynced);
    3. DIR/ray-state/committed.json names that generation and the ledger's length at 1,
       written temp-then-rename: this rename is the commit.

A resume (`restore`) truncates the ledger to the committed length (a tail written after
it describes work the committed state does not know: it moves to ledger.rolledback-*.jsonl)
and puts the committed state back into the storage before Tune reads it. The ledger and
Ray's state then agree on every trial: a trial Ray resumes continues from the checkpoint
the state names, a point the committed state never handed out is handed out once, and at
most the work since the last commit (seconds) is done again.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from .errors import ConfigError
from .storage import Storage

COMMITTED = "committed.json"
TUNE_STATE_FILES = ("experiment_state-", "search_gen_state-", "searcher-state-", "basic-variant-state-")


@dataclass(frozen=True)
class Commit:
    generation: str          # folder under DIR/ray-state holding Tune's files
    ledger_bytes: int        # the ledger's length when the commit was made
    files: tuple[str, ...]
    stamps: dict = field(default_factory=dict)   # file -> [size, mtime_ns] in the staging folder


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _copy_synced(src: Path, dst: Path) -> None:
    with open(src, "rb") as fin, open(dst, "wb") as fout:
        shutil.copyfileobj(fin, fout, 1 << 20)
        fout.flush()
        os.fsync(fout.fileno())


def committed(state_dir: Path) -> Commit | None:
    """The last commit, or None if the study never committed (or predates commits)."""
    path = Path(state_dir) / COMMITTED
    if not path.exists():
        return None
    try:   # written temp-then-rename: unreadable only if something else damaged it
        raw = json.loads(path.read_text(encoding="utf-8"))
        return Commit(raw["generation"], int(raw["ledger_bytes"]), tuple(raw["files"]), raw.get("stamps", {}))
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"{path}: unreadable ({type(e).__name__}); the study's last commit is lost") from None


def save(staging: Path, state_dir: Path, ledger_bytes: int, previous: Commit | None = None) -> Commit:
    """Copy Tune's staging files (top level: the experiment state, the searcher's state,
    tuner.pkl) into a new generation and commit it with the ledger's length. `previous` is
    the last commit (read from disk when not given); a file unchanged since it (same size and
    mtime: tuner.pkl, the state files of earlier sessions) is hard-linked, not copied again."""
    state_dir.mkdir(parents=True, exist_ok=True)
    previous = previous or committed(state_dir)
    number = int(previous.generation[1:]) + 1 if previous else 1
    generation = state_dir / f"g{number:06d}"
    shutil.rmtree(generation, ignore_errors=True)   # a half-made one from a killed driver
    generation.mkdir()
    stamps = {}
    for src in sorted(Path(staging).iterdir()):
        if not src.is_file() or src.name.startswith((".", "tmp")):
            continue
        st = src.stat()
        stamps[src.name] = [st.st_size, st.st_mtime_ns]
        if previous and previous.stamps.get(src.name) == stamps[src.name]:
            os.link(state_dir / previous.generation / src.name, generation / src.name)
        else:
            _copy_synced(src, generation / src.name)
    _fsync_dir(generation)
    commit = Commit(generation.name, ledger_bytes, tuple(stamps), stamps)
    tmp = state_dir / f".{COMMITTED}.tmp"
    tmp.write_text(json.dumps({"generation": commit.generation, "ledger_bytes": ledger_bytes,
                               "files": list(commit.files), "stamps": stamps, "t": round(time.time(), 3)}))
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, state_dir / COMMITTED)   # the commit
    _fsync_dir(state_dir)
    if previous and previous.generation != generation.name:
        shutil.rmtree(state_dir / previous.generation, ignore_errors=True)
    return commit


def restore(commit: Commit, state_dir: Path, storage: Storage) -> None:
    """Put the committed state into the storage's experiment folder, where Tune reads it,
    and remove any newer state file of Tune's that the commit does not know."""
    import pyarrow.fs as pafs

    fs, path = storage.filesystem()
    fs.create_dir(path, recursive=True)
    for info in fs.get_file_info(pafs.FileSelector(path)):
        if info.base_name.startswith(TUNE_STATE_FILES) and info.base_name not in commit.files:
            fs.delete_file(info.path)
    for name in commit.files:
        with open(state_dir / commit.generation / name, "rb") as src, fs.open_output_stream(f"{path}/{name}") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)


def trial_statuses(commit: Commit, state_dir: Path) -> dict[str, str]:
    """Trial id -> Tune's status (TERMINATED, ERROR, RUNNING, ...) in the committed state."""
    states = sorted(n for n in commit.files if n.startswith("experiment_state-"))
    if not states:
        return {}
    state = json.loads((state_dir / commit.generation / states[-1]).read_text())
    out = {}
    for trial_json, _ in state["trial_data"]:
        trial = json.loads(trial_json)
        out[trial["trial_id"]] = trial["status"]
    return out
