"""Export of a large study, side by side: vqstudy's export vs mlflow.search_runs, same store, same run.

Builds an MLflow SQLite store (schema and experiment created by MLflow itself) holding one
parent run and N trial runs as vqstudy's trainable records them: the 32 config params,
5 tags, 14 metrics with 4 evaluations of history each. The runs are bulk-inserted with SQL:
creating 10,000 runs through the client takes minutes and is not what is measured. Then:
  - vqstudy export (SQLite read) -> typed Arrow table -> Parquet;
  - vqstudy export through the MLflow client (its path for a remote tracking server);
  - mlflow.search_runs(...) -> pandas DataFrame (the peer), over the same runs.
Target (issue 4): exporting 10,000 runs takes <= 10 s.

    python benchmarks/export_bench.py [--runs 10000]
"""
from __future__ import annotations

import argparse
import sqlite3
import sys
import tempfile
import time
import uuid
from pathlib import Path

from vqstudy import tracking
from vqstudy.analysis.export import _runs_from_client, export_runs, to_table
from vqstudy.catalogue import METRICS as CATALOGUE
from vqstudy.config import TrialConfig
from vqstudy.folder import StudyFolder

METRICS = [name for name, m in CATALOGUE.items() if not m.modalities] + ["step"]   # what a vector trial logs


def build_store(folder: Path, n: int) -> tuple[str, str, str]:
    uri = StudyFolder(folder).default_tracking_uri
    exp = tracking.ensure_experiment(uri, "export-bench", folder / "mlartifacts")
    parent = tracking.start_parent(uri, exp, "export-bench", {tracking.STUDY_TAG: "export-bench"}, {})
    runs, params, tags, latest, history = [], [], [], [], []
    now = int(time.time() * 1000)
    base = TrialConfig().to_flat()
    for i in range(n):
        rid = uuid.uuid4().hex
        runs.append((rid, f"trial_{i}", "LOCAL", "", "", "bench", "FINISHED", now, now + 60_000, "", "active",
                     f"file:///tmp/{rid}", int(exp), None))
        flat = {**base, "quantizer.codebook_size": 2 ** (4 + i % 15), "train.seed": i % 3,
                "quantizer.name": ("vq", "ema", "simvq")[i % 3]}
        params += [(k, str(v), rid) for k, v in flat.items()]
        tags += [(k, v, rid) for k, v in {tracking.PARENT_TAG: parent, tracking.TRIAL_TAG: f"{i:08x}",
                                          tracking.STUDY_TAG: "export-bench", "vqstudy.version": "0.1.0",
                                          tracking.OUTCOME_TAG: "finished", "mlflow.runName": f"trial_{i}"}.items()]
        for j, key in enumerate(METRICS):
            for step in (250, 500, 750, 1000):
                value = float(step) if key == "step" else 1.0 / (1 + i + j + step)
                history.append((key, value, now + step, rid, step, 0))
            latest.append((key, 1000.0 if key == "step" else 1.0 / (1 + i + j + 1000), now + 1000, 1000, 0, rid))
    con = sqlite3.connect(uri[len("sqlite:///"):])
    with con:
        con.executemany("INSERT INTO runs (run_uuid, name, source_type, source_name, entry_point_name, user_id, "
                        "status, start_time, end_time, source_version, lifecycle_stage, artifact_uri, "
                        "experiment_id, deleted_time) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?)", runs)
        con.executemany("INSERT INTO params (key, value, run_uuid) VALUES (?,?,?)", params)
        con.executemany("INSERT INTO tags (key, value, run_uuid) VALUES (?,?,?)", tags)
        con.executemany("INSERT INTO metrics (key, value, timestamp, run_uuid, step, is_nan) VALUES (?,?,?,?,?,?)",
                        history)
        con.executemany("INSERT INTO latest_metrics (key, value, timestamp, step, is_nan, run_uuid) "
                        "VALUES (?,?,?,?,?,?)", latest)
    con.close()
    return uri, exp, parent


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--runs", type=int, default=10_000)
    args = p.parse_args()
    import mlflow

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        print(f"building a store of {args.runs:,} runs ...", file=sys.stderr)
        uri, exp, parent = build_store(folder, args.runs)
        mlflow.set_tracking_uri(uri)
        query = f"tags.`{tracking.PARENT_TAG}` = '{parent}'"
        rows = []
        t, table = timed(lambda: export_runs(uri, exp, parent, folder / "results.parquet"))
        rows.append(("vqstudy export (SQLite read -> Parquet)", t, table.num_rows))
        t, table = timed(lambda: to_table(_runs_from_client(uri, exp, parent)))
        rows.append(("vqstudy export via MLflow client (tracking-server path)", t, table.num_rows))
        t, frame = timed(lambda: mlflow.search_runs([exp], filter_string=query, max_results=100_000))
        rows.append(("mlflow.search_runs -> pandas (peer)", t, len(frame)))

    peer = rows[-1][1]
    print(f"\n{args.runs:,} trial runs, 32 params + 5 tags + 14 metrics each (x4 history), SQLite store\n")
    print("| export | seconds | runs | x mlflow.search_runs |")
    print("|---|---:|---:|---:|")
    for name, seconds, n in rows:
        print(f"| {name} | {seconds:.2f} | {n:,} | {seconds / peer:.2f} |")


if __name__ == "__main__":
    main()
