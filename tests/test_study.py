"""Study files: expansion, includes, dry-run, and the table of bad inputs (all rejected
before Ray starts: exit 2, one line naming the file and the key, nothing written)."""
from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from vqstudy.cli import main
from vqstudy.config import ConfigError
from vqstudy.study import load_study
from vqstudy.tables import trial_table

BASE = """
name: s
base:
  train: {steps: 30, eval_every: 10}
"""


def write(tmp_path, text: str, name: str = "study.yaml"):
    path = tmp_path / "studies" / name
    path.parent.mkdir(exist_ok=True)
    path.write_text(text)
    return path


def test_grid_times_repeats():
    """Grid points are the cartesian product, each repeated with seeds base, base+1, ..."""
    import vqstudy.study as st

    study = st.parse_study({"name": "g", "base": {"train.seed": 5, "train.steps": 40},
                            "sweep": {"grid": {"quantizer.name": ["vq", "simvq"], "quantizer.codebook_size": [8, 16, 32]},
                                      "repeats": 2}})
    points = study.points()
    assert study.num_trials == len(points) == 12
    assert points[0] == {"quantizer.name": "vq", "quantizer.codebook_size": 8, "train.seed": 5}
    assert points[1]["train.seed"] == 6 and points[-1]["quantizer.name"] == "simvq"
    assert study.total_steps() == 12 * 40


def test_grid_values_are_coerced_and_steps_summed_per_point():
    """Grid values are typed by their key; total steps follow a swept train.steps."""
    import vqstudy.study as st

    study = st.parse_study({"name": "g", "sweep": {"grid": {"train.steps": ["100", 300], "train.lr": ["1e-3"]}}})
    assert study.grid == {"train.steps": [100, 300], "train.lr": [1e-3]}
    assert study.total_steps() == 400


def test_search_per_grid_point(tmp_path):
    """With a search, each grid point x seed gets num_samples trials; the table shows distributions."""
    path = write(tmp_path, BASE + textwrap.dedent("""
    sweep:
      grid: {quantizer.codebook_size: [16, 64]}
      repeats: 2
      search:
        algorithm: optuna
        num_samples: 3
        train.lr: {loguniform: [1.0e-4, 1.0e-2]}
        model.encoder_width: {int: [16, 64]}
        quantizer.name: {choice: [vq, simvq]}
      metric: [recon_mse, utilization]
      mode: [min, max]
    """))
    study = load_study(path)
    assert study.num_trials == 2 * 2 * 3 and study.multi_objective
    rows = trial_table(study)
    assert len(rows) == 12 and rows[0]["train.lr"] == "~loguniform(0.0001, 0.01)"
    assert [r["point"] for r in rows[:4]] == [0, 0, 0, 1]


def test_include_merges_fragment_under_the_study(tmp_path):
    """sweep.include pulls search_spaces/NAME.yaml; the study's own keys win, grids merge."""
    (tmp_path / "search_spaces").mkdir()
    (tmp_path / "search_spaces" / "sizes.yaml").write_text(
        "grid:\n  quantizer.codebook_size: [16, 64]\n  quantizer.name: [vq]\nrepeats: 3\n")
    path = write(tmp_path, BASE + textwrap.dedent("""
    sweep:
      include: sizes
      grid: {quantizer.name: [vq, simvq]}
      repeats: 2
    """))
    study = load_study(path)
    assert study.grid == {"quantizer.codebook_size": [16, 64], "quantizer.name": ["vq", "simvq"]}
    assert study.sweep.repeats == 2 and study.num_trials == 8


def test_shipped_studies_validate():
    """Every study in studies/ loads, and every grid point is a valid trial."""
    from pathlib import Path

    root = Path(__file__).parent.parent
    paths = sorted((root / "studies").glob("*.yaml"))
    assert {p.stem for p in paths} >= {"quickstart", "codebook_scaling", "encoder_capacity", "latent_dim",
                                       "deferred_quantization", "lr_search"}
    for p in paths:
        study = load_study(p)
        assert study.num_trials > 0 and study.description


def test_dry_run_prints_table_count_and_steps(tmp_path, capsys):
    """--dry-run validates and expands: a row per trial, the count and the total steps; no folder."""
    path = write(tmp_path, BASE + "sweep:\n  grid: {quantizer.codebook_size: [16, 64, 256]}\n")
    assert main(["run", str(path), "--dry-run", "--out", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert "s: 3 trials, 90 training steps in total" in out
    assert len([line for line in out.splitlines() if line.split()[:1] in (["0"], ["1"], ["2"])]) == 3
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("text, code", [
    (BASE + "sweep:\n  grid: {quantizer.codebook_size: [16]}\n", 0),
    (BASE + "sweep:\n  grid: {quantizer.name: [vqq]}\n", 2),
], ids=["dry-run", "bad input"])
def test_validation_imports_neither_ray_nor_torch(tmp_path, text, code):
    """Dry-run and bad-input errors answer without importing Ray or torch (torch alone takes
    ~2 s to import on a small machine; these must answer before a cluster starts)."""
    path = write(tmp_path, text)
    script = ("import sys; from vqstudy.cli import main; rc = main(['run', %r, '--dry-run']);"
              "heavy = [m for m in ('ray', 'torch') if m in sys.modules];"
              "assert rc == %d and not heavy, (rc, heavy)")
    subprocess.run([sys.executable, "-c", script % (str(path), code)], check=True, capture_output=True)


BAD = [
    ("unknown top-level key", "name: s\nsweeep: {}\n", "sweeep: unknown key (allowed: name, description"),
    ("missing name", "base: {}\n", "name: required"),
    ("name with a newline", 'name: "s\\n"\n', "name: required, letters, digits"),
    ("unknown sweep key", BASE + "sweep: {grids: {}}\n", "sweep.grids: unknown key"),
    ("unknown base key", "name: s\nbase: {train: {stepz: 3}}\n", "base: train.stepz: unknown key (did you mean train.steps?)"),
    ("negative steps", "name: s\nbase: {train: {steps: -10}}\n", "train.steps: -10 is out of range (must be >= 1)"),
    ("unknown dataset", "name: s\nbase: {data: {name: imagenet}}\n", "data.name: 'imagenet' is not one of"),
    ("wrong type", BASE + "sweep: {repeats: two}\n", "sweep.repeats: 'two' is not a valid int"),
    ("empty grid", BASE + "sweep: {grid: {quantizer.codebook_size: []}}\n", "sweep.grid.quantizer.codebook_size: expected a non-empty list"),
    ("unknown quantizer", BASE + "sweep: {grid: {quantizer.name: [vq, vqq]}}\n", "quantizer.name: 'vqq' is not one of vq, ema, simvq, cvq, ibq, fsq, lfq"),
    ("grid value wrong type", BASE + "sweep: {grid: {quantizer.codebook_size: [16, big]}}\n", "quantizer.codebook_size: 'big' is not a valid int"),
    ("impossible combination", BASE + "  quantizer: {init: kmeans}\nsweep: {grid: {quantizer.name: [vq, simvq]}}\n", "kmeans needs a learnable codebook"),
    ("missing include", BASE + "sweep: {include: nowhere}\n", "sweep.include: no fragment 'nowhere'"),
    ("yaml syntax error", "name: s\nbase: {train: [\n", "YAML syntax error at line"),
    ("unknown distribution", BASE + "sweep: {search: {train.lr: {normal: [0, 1]}}}\n", "sweep.search.train.lr: expected one of {loguniform"),
    ("loguniform from zero", BASE + "sweep: {search: {train.lr: {loguniform: [0, 1]}}}\n", "train.lr: 0.0 is out of range (must be > 0.0)"),
    ("reversed bounds", BASE + "sweep: {search: {quantizer.beta: {uniform: [0.5, 0.1]}}}\n", "low 0.5 must be below high 0.1"),
    ("int range on a float key", BASE + "sweep: {search: {train.lr: {int: [1, 3]}}}\n", "sweep.search.train.lr.int: train.lr takes floats"),
    ("unknown algorithm", BASE + "sweep: {search: {algorithm: bayes, train.lr: {uniform: [0.1, 1]}}}\n", "sweep.search.algorithm: 'bayes' is not one of random, optuna"),
    ("zero samples", BASE + "sweep: {search: {num_samples: 0, train.lr: {uniform: [0.1, 1]}}}\n", "sweep.search.num_samples: 0 is out of range"),
    ("search without keys", BASE + "sweep: {search: {algorithm: optuna}}\n", "sweep.search: no searched keys"),
    ("key both gridded and searched", BASE + "sweep: {grid: {train.lr: [0.1]}, search: {train.lr: {uniform: [0.1, 1]}}}\n", "also in sweep.grid"),
    ("unknown metric", BASE + "sweep: {metric: accuracy}\n", "sweep.metric: 'accuracy' is not one of recon_mse"),
    ("bad mode", BASE + "sweep: {mode: maximize}\n", "sweep.mode: 'maximize' is not one of min, max"),
    ("multi-objective without optuna", BASE + "sweep: {metric: [recon_mse, utilization], mode: [min, max], search: {train.lr: {uniform: [0.1, 1]}}}\n", "several metrics need sweep.search.algorithm: optuna"),
    ("asha on two metrics", BASE + "sweep: {metric: [recon_mse, utilization], mode: [min, max], scheduler: asha, search: {algorithm: optuna, train.lr: {uniform: [0.1, 1]}}}\n", "asha stops trials on one metric"),
    ("unknown scheduler", BASE + "sweep: {scheduler: hyperband}\n", "sweep.scheduler.name: 'hyperband' is not one of fifo, asha"),
    ("reduction factor 1", BASE + "sweep: {scheduler: {name: asha, reduction_factor: 1}}\n", "sweep.scheduler.reduction_factor: 1.0 is out of range (must be > 1)"),
    ("zero cpus", BASE + "resources: {cpu: 0}\n", "resources.cpu: 0.0 is out of range (must be > 0)"),
    ("fractional concurrency", BASE + "resources: {max_concurrent: 1.5}\n", "resources.max_concurrent: 1.5 is not a valid int"),
    ("gpu above one not whole", BASE + "resources: {gpu: 1.5}\n", "resources.gpu: 1.5 (a fraction must be <= 1"),
    ("seed gridded and repeated", BASE + "sweep: {grid: {train.seed: [1, 2]}, repeats: 2}\n", "conflicts with sweep.repeats"),
    ("unknown tracking key", BASE + "tracking: {uri: x}\n", "tracking.uri: unknown key (allowed: experiment, artifacts)"),
]


@pytest.mark.parametrize("text, message", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_study_is_one_line_exit_2_nothing_written(text, message, tmp_path, monkeypatch, capsys):
    """Each malformed study: exit 2, one stderr line with the file, the key and what is allowed; no output folder."""
    monkeypatch.chdir(tmp_path)
    path = write(tmp_path, text)
    assert main(["run", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(path) in err and message in err, err
    assert not (tmp_path / "runs").exists()


def test_missing_study_file(tmp_path, capsys):
    """A study path that does not exist: exit 2, one line."""
    assert main(["run", str(tmp_path / "nope.yaml")]) == 2
    assert "nope.yaml: cannot read" in capsys.readouterr().err


@pytest.mark.parametrize("dry_run", [False, True], ids=["run", "dry-run"])
def test_gpu_request_on_a_machine_without_gpu(tmp_path, capsys, monkeypatch, dry_run):
    """resources.gpu on a machine with no GPU (and no cluster address) is refused before Ray
    starts, by a run and by a dry run alike."""
    import vqstudy.devices as devices
    import vqstudy.driver as driver

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(devices, "local_gpus", lambda: 0)
    monkeypatch.setattr(driver, "connect", lambda address: pytest.fail("Ray was started"))
    path = write(tmp_path, BASE + "resources: {gpu: 0.25}\n")
    assert main(["run", str(path), "--out", str(tmp_path / "out"), *(["--dry-run"] if dry_run else [])]) == 2
    err = capsys.readouterr().err
    assert "resources.gpu: 0.25 asked per trial but this machine has no CUDA device" in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "out").exists()


def test_cuda_index_beyond_a_trials_gpus(tmp_path, capsys):
    """train.device: cuda:1 with one GPU per trial names what a trial sees (Ray renumbers from 0)."""
    path = write(tmp_path, BASE + "resources: {gpu: 1}\n")
    assert main(["run", str(path), "--dry-run", "--set", "train.device=cuda:1"]) == 2
    assert "train.device: cuda:1 but a trial sees 1 GPU (cuda:0: Ray numbers" in capsys.readouterr().err


def test_override_errors_name_set(tmp_path, capsys):
    """--set on a study is checked like the base: unknown keys are named."""
    path = write(tmp_path, BASE)
    assert main(["run", str(path), "--dry-run", "--set", "train.stepz=3"]) == 2
    assert "train.stepz: unknown key" in capsys.readouterr().err


def test_config_error_type_is_shared():
    """Study problems are ConfigErrors, like trial-config problems."""
    import vqstudy.study as st

    with pytest.raises(ConfigError):
        st.parse_study({"name": "x", "sweep": {"repeats": 0}})


def test_resolved_study_reads_back_as_itself():
    """Study.to_raw() (what a study folder's study.yaml holds) parses back to the same study,
    for every shipped study: the writer and the parser are one schema."""
    from pathlib import Path

    import yaml

    import vqstudy.study as st

    for p in sorted((Path(__file__).parent.parent / "studies").glob("*.yaml")):
        study = load_study(p)
        again = st.parse_study(yaml.safe_load(yaml.safe_dump(study.to_raw())), p)
        assert again == study, p.name


def test_scheduler_registry_entries_build():
    """Every scheduler entry parses from a study file with its options and builds a Ray scheduler."""
    from ray.tune.schedulers import TrialScheduler

    import vqstudy.study as st
    from vqstudy.schedulers import SCHEDULERS

    for name in SCHEDULERS:
        study = st.parse_study({"name": "s", "sweep": {"scheduler": name}})
        assert isinstance(study.scheduler.build(study), TrialScheduler), name
    asha = st.parse_study({"name": "s", "base": {"train.steps": 100, "train.eval_every": 10},
                           "sweep": {"scheduler": {"name": "asha", "grace_period": 3}}}).scheduler
    assert (asha.grace_period, asha.reduction_factor) == (3, 2.0)


def test_per_point_plan_hands_out_points_round_robin():
    """Without Ray: each (point, seed) gets num_samples trials, points take turns, then it is done."""
    import vqstudy.study as st
    from vqstudy.search import PerPointPlan

    study = st.parse_study({"name": "s", "sweep": {"grid": {"quantizer.codebook_size": [8, 16]},
                                                   "search": {"num_samples": 2, "train.lr": {"loguniform": [1e-4, 1e-2]}}}})
    plan = PerPointPlan(study)
    configs = [plan.suggest(f"t{i}") for i in range(5)]
    assert [c["quantizer.codebook_size"] for c in configs[:4]] == [8, 16, 8, 16] and configs[4] is None
    assert all(1e-4 <= c["train.lr"] <= 1e-2 for c in configs[:4])
    plan.complete("t0", {"recon_mse": 0.5}, error=False)
    plan.complete("t1", {"recon_mse": 0.5, "outcome": "diverged"}, error=False)
    states = [t.state.name for s in plan.studies for t in s.trials]
    assert states.count("COMPLETE") == 1 and states.count("FAIL") == 1


def test_planned_steps_follow_a_swept_train_steps():
    """A trial's planned steps are the base's, or its own when the study sweeps train.steps."""
    import vqstudy.study as st

    study = st.parse_study({"name": "s", "base": {"train.steps": 40},
                            "sweep": {"grid": {"train.steps": [40, 80], "quantizer.codebook_size": [8]}}})
    assert [study.planned_steps(p) for p in study.points()] == [40, 80]
    assert st.parse_study({"name": "s", "base": {"train.steps": 30}}).planned_steps({"train.seed": 1}) == 30
