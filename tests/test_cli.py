"""The `vqstudy` command as a user runs it: a subprocess, its stdout, stderr and exit code."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from vqstudy.cli import main

TINY = ["--set", "train.steps=6", "--set", "train.eval_every=3", "--set", "data.num_train=128",
        "--set", "data.num_eval=64", "--set", "quantizer.codebook_size=16", "--set", "train.device=cpu"]


def vqstudy(*args: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vqstudy.cli", *args], capture_output=True, text=True, cwd=cwd)


def run_main(args: list[str], capsys) -> tuple[int, str, str]:
    """The CLI's main() in-process (no torch start-up per case): exit code, stdout, stderr."""
    try:
        code = main(args)
    except SystemExit as e:  # argparse exits on usage errors
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def test_train_json_is_the_last_stdout_line():
    """--json: the last line of stdout is one JSON object of the final metrics; progress on stderr."""
    r = vqstudy("train", *TINY, "--json")
    assert r.returncode == 0, r.stderr
    metrics = json.loads(r.stdout.strip().splitlines()[-1])
    assert metrics["step"] == 6 and 0 < metrics["utilization"] <= 1
    assert "step 3/6" in r.stderr and "step 6/6" in r.stderr


def test_train_with_config_file_prints_a_table(tmp_path):
    """--config FILE with --set on top; without --json a key/value table."""
    cfg = tmp_path / "c.yaml"
    cfg.write_text("quantizer:\n  name: simvq\n  codebook_size: 8\n")
    r = vqstudy("train", "--config", str(cfg), *TINY)
    assert r.returncode == 0, r.stderr
    rows = dict(line.split(None, 1) for line in r.stdout.strip().splitlines())
    assert rows["step"] == "6" and float(rows["utilization"]) > 0


@pytest.mark.parametrize("args, message", [
    (["train", "--set", "quantizer.nam=vq"], "quantizer.nam: unknown key (did you mean quantizer.name?)"),
    (["train", "--set", "quantizer.name=vqq"], "quantizer.name: 'vqq' is not one of vq, ema, simvq, cvq, ibq, fsq, lfq"),
    (["train", "--set", "train.steps=-1"], "train.steps: -1 is out of range"),
    (["train", "--set", "train.steps"], "expected key=value"),
    (["train", "--config", "missing.yaml"], "missing.yaml: cannot read"),
    (["train", "--set", "data.name=mnist", "--set", "data.root=/nonexistent"], "data.root: MNIST not found"),
    (["train", "--set", "train.device=cuda:7"], "train.device: cuda:7 asked but this machine has"),
    (["train", "--set", "train.precision=fp16"], "train.precision: 'fp16' is not one of fp32, bf16"),
    (["fly"], "invalid choice: 'fly'"),
    ([], "the following arguments are required"),
])
def test_bad_input_is_one_line_and_exit_2(args, message, tmp_path, monkeypatch, capsys):
    """Bad input: exit code 2, one stderr line naming the problem, nothing on stdout."""
    monkeypatch.chdir(tmp_path)
    code, out, err = run_main(args, capsys)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1 and out == ""


def test_yaml_syntax_error_in_a_subprocess(tmp_path):
    """As a user sees it: a broken YAML file is named with its line, exit 2, no traceback."""
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  steps: [1,\n")
    r = vqstudy("train", "--config", str(bad))
    assert r.returncode == 2 and f"{bad}: YAML syntax error at line" in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_list_names_every_registered_thing(capsys):
    """`vqstudy list` prints each quantizer with its options and each dataset."""
    from vqstudy.data import DATASETS
    from vqstudy.quantizers import QUANTIZERS

    code, out, _ = run_main(["list", "--keys"], capsys)
    assert code == 0
    for name in [*QUANTIZERS, *DATASETS, "quantizer.codebook_size", "options: beta=0.25"]:
        assert name in out
    assert "eps=" not in out                       # ema's eps is no config key: nothing can set it
    from vqstudy.config import describe

    keys = out.split("config keys:\n")[1].splitlines()
    assert len({line.rindex(doc) for line, (_, _, doc) in zip(keys, describe())}) == 1   # docs in one column


def test_set_on_a_swept_key_is_refused(capsys):
    """--set on a key the study sweeps would be overwritten in every trial: exit 2, named."""
    code, out, err = run_main(["run", "studies/quickstart.yaml", "--dry-run", "--set", "quantizer.codebook_size=8"],
                              capsys)
    assert code == 2 and "--set: quantizer.codebook_size: studies/quickstart.yaml sweeps this key" in err


def test_dry_run_into_a_closed_pipe_is_quiet(tmp_path):
    """`vqstudy run STUDY --dry-run | head -1` on a table longer than the pipe holds: exit 0,
    nothing on stderr."""
    study = tmp_path / "long.yaml"
    study.write_text("name: long\nbase: {train: {steps: 10}}\nsweep: {grid: {quantizer.codebook_size: [16]}, "
                     "repeats: 3000}\n")
    r = subprocess.run(f"set -o pipefail; {Path(sys.executable).parent / 'vqstudy'} run {study} --dry-run | head -1",
                       shell=True, capture_output=True, text=True, executable="/bin/bash")
    assert r.returncode == 0 and r.stdout.startswith("trial") and r.stderr == ""


def test_divergence_exits_1(capsys):
    """A diverging trial prints why on stderr and exits 1 (not 2: the input was valid)."""
    code, _, err = run_main(["train", *TINY, "--set", "train.lr=1e6", "--set", "train.eval_every=1"], capsys)
    assert code == 1 and "trial diverged: loss became" in err
