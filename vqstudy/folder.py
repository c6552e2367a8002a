"""The study folder: its layout, what it stores about itself, and reading its trials back.

    DIR/study.yaml     the study as resolved (includes merged, --set applied): what resume reruns
    DIR/vqstudy.json   where its records are (`Records`): tracking URI, experiment and parent-run ids
    DIR/ray/           Ray Tune's experiment state, trial folders and checkpoints (unless --storage
                       put them elsewhere: `Records.storage`, storage.py)
    DIR/mlflow.db      the default MLflow store, DIR/mlartifacts/ its artifacts
    DIR/ledger.jsonl   the driver's own record of every trial event (ledger.py): what MLflow is written from
    DIR/ray-state/     the copy of Ray's experiment state committed with the ledger (snapshot.py)
    DIR/figures/       per-trial figures, copied out of each trial's final checkpoint
    DIR/results.parquet  the export (`vqstudy export`); DIR/analysis/ fits, figures, report

The driver creates a folder; `resume`, `status`, `export` and `analyze` read it. No other
module knows this layout. Reading it needs no Ray cluster: the trials are read from the
ledger, Ray's statuses from the committed state.
"""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from .fields import load_yaml
from .catalogue import HEADLINE
from .errors import ConfigError
from .outcome import Outcome
from .storage import Storage
from .study import Study, parse_study

RAY_DIR = "ray"
RECORDS_FILE = "vqstudy.json"
STUDY_FILE = "study.yaml"


@dataclass
class Records:
    """Where a study's records are (vqstudy.json). Relative to the folder wherever it can be:
    the default store is written as `null` ("the mlflow.db beside me"), so a folder that is
    moved or copied keeps working, and a copy never writes into the original's store."""
    tracking_uri: str | None          # None on disk: this folder's mlflow.db (resolved on load)
    experiment_id: str
    parent_run_id: str
    study_path: str | None = None     # the study file it was started from (for its git commit)
    storage: str | None = None        # --storage URI holding Ray's state; None: this folder
    experiment_dir: str = RAY_DIR     # Ray's experiment folder inside the storage
    root: str | None = None           # where the folder was when these were written (relocation)


class StudyFolder:
    def __init__(self, root: str | Path):
        self.root = Path(root)

    @property
    def ray_dir(self) -> Path:
        return self.root / RAY_DIR

    @property
    def default_tracking_uri(self) -> str:
        """The embedded store: an absolute sqlite URI (trials chdir into their own folders)."""
        return f"sqlite:///{self.root.resolve() / 'mlflow.db'}"

    @property
    def artifact_root(self) -> Path:
        return self.root / "mlartifacts"

    @property
    def ledger_file(self) -> Path:
        return self.root / "ledger.jsonl"

    @property
    def state_dir(self) -> Path:
        return self.root / "ray-state"

    @property
    def figures_dir(self) -> Path:
        return self.root / "figures"

    @property
    def results_file(self) -> Path:
        return self.root / "results.parquet"

    @property
    def analysis_dir(self) -> Path:
        return self.root / "analysis"

    def has_run(self) -> bool:
        """A study has been started here (its records or Ray's folder exist)."""
        return self.ray_dir.exists() or (self.root / RECORDS_FILE).exists()

    def check_new(self) -> None:
        """Refuse a --out that would overwrite anything: a file, a study already started
        there, or a folder holding anything else (a study file with comments, say)."""
        if self.root.exists() and not self.root.is_dir():
            raise ConfigError(f"--out: {self.root} is a file; give a folder (new or empty)")
        if self.has_run():
            raise ConfigError(f"--out: {self.root} already holds a study; `vqstudy resume {self.root}` continues it, "
                              f"or choose another --out")
        if self.root.is_dir() and any(p.name != self.ledger_file.name for p in self.root.iterdir()):
            raise ConfigError(f"--out: {self.root} is not empty and holds no study; give a new or empty folder")

    def has_trials(self) -> bool:
        """The ledger speaks of at least one trial."""
        from .ledger import replay

        return bool(replay(self.ledger_file))

    def ray_statuses(self) -> dict[str, str] | None:
        """Trial id -> Tune's status in the last committed state (None: nothing committed)."""
        from . import snapshot

        commit = snapshot.committed(self.state_dir)
        return None if commit is None else snapshot.trial_statuses(commit, self.state_dir)

    def storage(self, records: Records) -> Storage:
        """Where Ray keeps this study's state and checkpoints."""
        return Storage(records.storage or str(self.root.resolve()), records.experiment_dir)

    def write_study(self, study: Study) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / STUDY_FILE).write_text(yaml.safe_dump(study.to_raw(), sort_keys=False))

    def write_records(self, records: Records) -> None:
        """Write vqstudy.json temp-then-rename, the default store as null."""
        raw = dataclasses.asdict(records)
        if records.tracking_uri == self.default_tracking_uri:
            raw["tracking_uri"] = None
        raw["root"] = str(self.root.resolve())
        tmp = self.root / f".{RECORDS_FILE}.tmp"
        tmp.write_text(json.dumps(raw, indent=2))
        os.replace(tmp, self.root / RECORDS_FILE)

    def relocate(self, records: Records) -> None:
        """After a move or copy: point the default store's artifact locations at this folder
        (MLflow keeps them absolute), and note where the folder now is. Commands that write
        to MLflow call this first; reading needs nothing."""
        here = str(self.root.resolve())
        if records.root in (None, here):
            return
        if records.tracking_uri == self.default_tracking_uri:
            from .tracking import relocate_artifacts

            relocate_artifacts(self.root / "mlflow.db", Path(records.root) / "mlartifacts", self.artifact_root)
        records.root = here
        self.write_records(records)

    def load(self) -> tuple[Study, Records]:
        """The stored study and records (ConfigError if this is not a study folder)."""
        if not self.root.is_dir():
            raise ConfigError(f"{self.root}: no such study folder")
        if not (self.root / RECORDS_FILE).exists() or not (self.root / STUDY_FILE).exists():
            raise ConfigError(f"{self.root}: not a study folder (no {RECORDS_FILE}; "
                              f"`vqstudy run STUDY.yaml --out DIR` makes one)")
        records = self._read_records()
        study = parse_study(load_yaml(self.root / STUDY_FILE), self.root / STUDY_FILE)
        if records.study_path:
            study.path = Path(records.study_path)
        return study, records

    def _read_records(self) -> Records:
        path = self.root / RECORDS_FILE
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
            records = Records(**raw)
        except (OSError, UnicodeDecodeError, ValueError, TypeError) as e:
            raise ConfigError(f"{path}: unreadable or not vqstudy's ({type(e).__name__}: {str(e).splitlines()[0]})"
                              ) from None
        if records.tracking_uri is None or _moved_default(records, self):
            records.tracking_uri = self.default_tracking_uri
        return records

    def check_ray_state(self, records: Records) -> None:
        """Refuse a Ray experiment state that cannot resume this study exactly, naming it:
        - empty or cut short: Ray writes it in place, and a driver killed during that write
          leaves it so; Tune would resume only part of the study without saying so;
        - older than the ledger: it does not know trials the driver started after it was
          saved (a remote storage receives it every few seconds); Tune would run their grid
          points again beside the records of the first attempt."""
        from . import storage as st
        from .ledger import replay

        where = self.storage(records)
        states = st.list_names(where, "experiment_state-")
        if not states:
            raise ConfigError(f"{where.describe()}: no Ray experiment state to resume from")
        try:
            state = json.loads(st.read_text(where, states[-1]))
        except ValueError:
            raise ConfigError(f"{where.describe()}/{states[-1]}: Ray's experiment state is empty or cut short (the "
                              f"driver was killed while Ray wrote it); this study cannot be resumed: run it again "
                              f"into a new --out") from None
        known = {json.loads(trial)["trial_id"] for trial, _ in state["trial_data"]}
        unknown = sorted(set(replay(self.ledger_file)) - known)
        if unknown:
            raise ConfigError(f"{where.describe()}/{states[-1]}: Ray's saved state is older than the study's ledger "
                              f"(it does not know trial {', '.join(unknown[:3])}{' ...' if len(unknown) > 3 else ''}); "
                              f"resuming would run those points twice: run the study again into a new --out")

    def trial_rows(self, study: Study) -> list[dict[str, Any]]:
        """One row per trial the ledger knows, in the order of the study's points: trial_id,
        outcome, failures, the trial's config keys, the step reached and the headline metrics."""
        from .ledger import replay

        rows = []
        for t in sorted(replay(self.ledger_file).values(), key=_grid_order(study)):
            last = t.results[-1] if t.results else {}
            rows.append({"trial_id": t.trial_id, "outcome": Outcome(t.outcome) if t.outcome else Outcome.NOT_FINISHED,
                         "failures": t.failures, **t.config,
                         **{k: last[k] for k in ("step", *HEADLINE) if k in last}})
        return rows


def _moved_default(records: Records, folder: StudyFolder) -> bool:
    """A folder written before the default store was recorded as null: its absolute URI
    names the mlflow.db of the folder's old place."""
    uri = records.tracking_uri or ""
    return (uri.startswith("sqlite:///") and uri.endswith("/mlflow.db")
            and uri != folder.default_tracking_uri and (folder.root / "mlflow.db").exists()
            and Path(uri.removeprefix("sqlite:///")).parent.name == folder.root.name)


def _grid_order(study: Study):
    """Sort key putting trials in the order of the study's points (then by trial id)."""
    points = study.points()
    index = {tuple(sorted(p.items())): i for i, p in enumerate(points)}
    keys = list(points[0])

    def key(trial):
        point = tuple(sorted((k, trial.config.get(k)) for k in keys))
        return index.get(point, len(index)), trial.trial_id
    return key

