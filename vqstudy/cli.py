"""The `vqstudy` command.

    vqstudy train [--config FILE] [--set key=value]... [--json]
    vqstudy list [--keys]
    vqstudy run STUDY.yaml [--out DIR] [--address ADDR] [--tracking-uri URI] [--dry-run] [--set key=value]...
    vqstudy resume DIR [--address ADDR]
    vqstudy status DIR
    vqstudy export DIR | --experiment NAME [--tracking-uri URI] [-o FILE]
    vqstudy analyze DIR

Bad input (unknown key, wrong type, missing file, YAML error) gets one line on stderr
naming the problem and exit code 2, never a traceback.
"""
from __future__ import annotations

import argparse
import errno
import json
import os
import sys
import time

from .catalogue import HEADLINE
from .config import TrialConfig, all_keys, describe
from .errors import ConfigError
from .fields import parse_assignments
from .tables import fmt

EXIT_BAD_INPUT = 2


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (not usage + error) and exit code 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        sys.stderr.write(f"{self.prog}: error: {message} (see {self.prog} --help)\n")
        sys.exit(EXIT_BAD_INPUT)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="vqstudy", description="Scaling studies of vector-quantized autoencoders.")
    sub = parser.add_subparsers(dest="verb", required=True, parser_class=_Parser)

    p = sub.add_parser("train", help="train one trial and print its final metrics")
    p.add_argument("--config", help="trial config YAML (nested or dotted keys)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one config key, e.g. --set quantizer.codebook_size=1024 (repeatable)")
    p.add_argument("--json", action="store_true", help="print the final metrics as one JSON line")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("list", help="list the registered quantizers and datasets")
    p.add_argument("--keys", action="store_true", help="also list every config key with its default")
    p.set_defaults(func=cmd_list)

    p = sub.add_parser("run", help="run a study on Ray Tune, tracked in MLflow")
    p.add_argument("study", help="study YAML file")
    p.add_argument("--out", help="study folder (default runs/<name>)")
    p.add_argument("--address", help="join this Ray cluster (default: RAY_ADDRESS, else a local instance)")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: MLFLOW_TRACKING_URI, else DIR/mlflow.db)")
    p.add_argument("--storage", metavar="URI",
                   help="where Ray keeps trial state and checkpoints, reachable from every node: a path or a "
                        "pyarrow URI such as s3://bucket/prefix (default: the study folder)")
    p.add_argument("--dry-run", action="store_true", help="validate and print the trials without running them")
    p.add_argument("--analyze", action="store_true", help="export, fit, plot and report when the study ends")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a key of the study's base config (repeatable)")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("resume", help="finish an interrupted study")
    p.add_argument("dir", help="study folder")
    p.add_argument("--address", help="join this Ray cluster (default: RAY_ADDRESS, else a local instance)")
    p.set_defaults(func=cmd_resume)

    p = sub.add_parser("status", help="print a study's trial table from its stored state")
    p.add_argument("dir", help="study folder")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("export", help="write a study's trials as one Parquet table")
    p.add_argument("dir", nargs="?", help="study folder (default output DIR/results.parquet)")
    p.add_argument("--run", metavar="PARENT_RUN_ID", help="export the trials of this study's parent run from an "
                   "MLflow store, without the study folder")
    p.add_argument("--experiment", help="export every study of this MLflow experiment")
    p.add_argument("--tracking-uri", help="with --run/--experiment: the MLflow store (default: MLFLOW_TRACKING_URI)")
    p.add_argument("-o", "--output", help="Parquet file to write")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("analyze", help="export, fit scaling laws, plot and write the report of a study")
    p.add_argument("dir", help="study folder")
    p.set_defaults(func=cmd_analyze)
    return parser


def load_trial_config(path: str | None, overrides: list[str]) -> TrialConfig:
    cfg = TrialConfig.from_yaml(path) if path else TrialConfig()
    return cfg.with_overrides(overrides) if overrides else cfg


def progress_printer(total_steps: int):
    """A report() that keeps one progress line on stderr (rewritten in place on a terminal)."""
    start = time.perf_counter()
    tty = sys.stderr.isatty()

    def report(m: dict) -> None:
        headline = "  ".join(f"{k} {fmt(m[k])}" for k in HEADLINE)
        line = f"step {m['step']}/{total_steps}  {headline}  [{time.perf_counter() - start:.1f}s]"
        sys.stderr.write(("\r" + line) if tty else (line + "\n"))
        sys.stderr.flush()

    report.finish = lambda: tty and sys.stderr.write("\n")  # type: ignore[attr-defined]
    return report


def cmd_train(args: argparse.Namespace) -> int:
    from .train import Diverged, train  # torch import only when training

    cfg = load_trial_config(args.config, args.overrides)
    report = progress_printer(cfg.train.steps)
    try:
        metrics = train(cfg, report=report)
    except Diverged as e:
        report.finish()
        sys.stderr.write(f"vqstudy: trial diverged: {e}\n")
        return 1
    report.finish()
    if args.json:
        print(json.dumps(metrics))
    else:
        width = max(map(len, metrics))
        for key, value in metrics.items():
            print(f"{key:<{width}}  {fmt(value, 6)}")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .study import load_study
    from .tables import format_table, trial_table

    study = load_study(args.study, parse_assignments(args.overrides) if args.overrides else None)
    if args.dry_run:
        from .preflight import check_gpus_asked

        check_gpus_asked(study, args.address)
        print(format_table(trial_table(study)))
        print(f"\n{study.name}: {study.num_trials} trials, {study.total_steps():,} training steps in total")
        return 0
    from .driver import run

    out = Path(args.out or f"runs/{study.name}")
    code = run(study, out, args.address, args.tracking_uri, args.storage)
    if args.analyze:
        code = max(code, cmd_analyze(argparse.Namespace(dir=str(out))))
    return code


def cmd_resume(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .driver import resume

    return resume(Path(args.dir), args.address)


def cmd_status(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .folder import StudyFolder
    from .outcome import all_ok
    from .tables import format_table, outcome_summary, status_columns

    folder = StudyFolder(Path(args.dir))
    study, _ = folder.load()
    rows = folder.trial_rows(study)
    if not rows:
        print(f"{study.name}: no trial recorded yet (0/{study.num_trials})")
        return 1
    print(format_table(rows, status_columns(study, rows)))
    print(f"\n{study.name}: {outcome_summary(rows, study.num_trials)}")
    return 0 if all_ok([r["outcome"] for r in rows], study.num_trials) else 1


def cmd_export(args: argparse.Namespace) -> int:
    import os
    from pathlib import Path

    from .analysis import export_study
    from .analysis.export import export_runs
    from .folder import StudyFolder

    if sum(map(bool, (args.dir, args.run, args.experiment))) != 1:
        raise ConfigError("export: give one of a study folder, --run PARENT_RUN_ID or --experiment NAME")
    if args.output and Path(args.output).is_dir():
        raise ConfigError(f"-o: {args.output} is a folder; give a file name (e.g. {Path(args.output) / 'results.parquet'})")
    if args.dir:
        table = export_study(Path(args.dir), Path(args.output) if args.output else None)
        where = args.output or StudyFolder(args.dir).results_file
    else:
        uri = args.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
        if not uri or not args.output:
            raise ConfigError("export --run/--experiment: needs --tracking-uri (or MLFLOW_TRACKING_URI) and -o FILE")
        experiment_id, parent = _export_scope(uri, args.run, args.experiment)
        table = export_runs(uri, experiment_id, parent, Path(args.output))
        where = args.output
    print(f"{table.num_rows} trials, {table.num_columns} columns -> {where}")
    return 0


def _export_scope(uri: str, run: str | None, experiment: str | None) -> tuple[str, str | None]:
    """(experiment id, parent run id or None) of what --run / --experiment name in the store."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    if run:
        try:
            return client.get_run(run).info.experiment_id, run
        except MlflowException:
            raise ConfigError(f"--run: no run {run!r} in {uri}") from None
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        raise ConfigError(f"--experiment: no experiment {experiment!r} in {uri}")
    return exp.experiment_id, None


def cmd_analyze(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .analysis import analyze

    written = analyze(Path(args.dir))
    for path in written:
        print(path)
    return 0


def _first_line(doc: str | None) -> str:
    return " ".join((doc or "").strip().split("\n\n")[0].split())


def cmd_list(args: argparse.Namespace) -> int:
    from .fields import describe_fields
    from .quantizers import QUANTIZERS, options_of
    from .registry import DATASETS
    from .schedulers import SCHEDULERS

    settable = set(all_keys())
    print("quantizers:")
    for name, cls in QUANTIZERS.items():   # the options a study can set (quantizer.<option>)
        opts = ", ".join(f"{k}={v}" for k, v in options_of(name).items() if f"quantizer.{k}" in settable)
        print(f"  {name:<8} {_first_line(sys.modules[cls.__module__].__doc__)}")
        print(f"  {'':<8} options: {opts}")
    print("datasets:")
    for name, build in DATASETS.items():
        print(f"  {name:<17} {DATASETS.entry(name).modality:<7} {_first_line(build.__doc__)}")
    print("schedulers (sweep.scheduler):")
    for name, cls in SCHEDULERS.items():
        opts = ", ".join(f"{k}={v}" for k, v, _ in describe_fields(cls))
        print(f"  {name:<8} {_first_line(cls.__doc__)}" + (f"\n  {'':<8} options: {opts}" if opts else ""))
    if args.keys:
        print("config keys:")
        rows = [(key, "null" if default is None else str(default), doc) for key, default, doc in describe()]
        width = [max(len(row[i]) for row in rows) for i in (0, 1)]
        for key, default, doc in rows:
            print(f"  {key:<{width[0]}}  {default:<{width[1]}}  {doc}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as e:
        sys.stderr.write(f"vqstudy: error: {e}\n")
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        sys.stderr.write("\nvqstudy: interrupted\n")
        return 130
    except BrokenPipeError:   # `vqstudy ... | head`: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())   # nothing more to flush at exit
        return 0
    except OSError as e:   # a full disk, a read-only mount: what failed where, in one line
        where = f"{e.filename}: " if e.filename else ""
        code = f" [{errno.errorcode.get(e.errno, e.errno)}]" if e.errno else ""
        sys.stderr.write(f"vqstudy: error: {where}{e.strerror or e}{code}\n")
        return 1


if __name__ == "__main__":
    sys.exit(main())
