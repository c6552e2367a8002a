"""The training core: a smoke run per data kind, determinism, checkpoint-resume equality,
divergence, deferred quantization, and that the core never imports ray/optuna/mlflow."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from vqstudy.catalogue import eval_metrics
from vqstudy.quantizers import QUANTIZERS
from vqstudy.train import CHECKPOINT_FILE, Diverged, train

from .conftest import tiny_config


# tiny_config has K = 32, which FSQ reaches only with explicit levels
K32_OPTIONS = {"fsq": {"quantizer.levels": [8, 4]}}


@pytest.mark.parametrize("name", list(QUANTIZERS))
def test_smoke_vectors(name):
    """Each quantizer trains on vectors; reports at every eval; metrics finite and in range."""
    reports = []
    metrics = train(tiny_config(**{"quantizer.name": name}, **K32_OPTIONS.get(name, {})), report=reports.append)
    assert [r["step"] for r in reports] == [10, 20] and reports[-1] == metrics
    assert metrics.keys() == {"step", *eval_metrics("vector")}   # exactly what the catalogue lists
    assert all(torch.isfinite(torch.tensor(float(v))) for v in metrics.values())
    assert metrics["num_codes"] == 32
    assert 0 < metrics["utilization"] <= 1 and metrics["dead_codes"] == round(32 * (1 - metrics["utilization"]))


def test_fsq_metrics_count_its_real_codes():
    """fsq at codebook_size 1024 has the paper's 8*5*5*5 = 1000 codes; utilization is over those."""
    metrics = train(tiny_config(**{"quantizer.name": "fsq", "quantizer.codebook_size": 1024}))
    assert metrics["num_codes"] == 1000
    assert metrics["dead_codes"] == round(1000 * (1 - metrics["utilization"]))


def test_smoke_images_and_loss_decreases():
    """A conv model on shapes reports psnr, and reconstruction improves with training."""
    cfg = tiny_config(**{"data.name": "shapes", "data.image_size": 16, "train.steps": 40, "train.eval_every": 5,
                         "train.lr": 3e-3, "model.encoder_depth": 1, "model.decoder_depth": 1})
    reports = []
    metrics = train(cfg, report=reports.append)
    assert metrics.keys() == {"step", *eval_metrics("image")} and metrics["psnr"] > 0
    assert reports[-1]["recon_mse"] < reports[0]["recon_mse"]


def test_uneven_last_eval():
    """The last step always evaluates, even off the eval_every grid."""
    reports = []
    train(tiny_config(**{"train.steps": 25}), report=reports.append)
    assert [r["step"] for r in reports] == [10, 20, 25]


def test_deterministic_for_a_seed():
    """Same seed, same metrics; another seed, other metrics."""
    cfg = tiny_config()
    a, b = train(cfg), train(cfg)
    c = train(cfg.with_overrides(["train.seed=1"]))
    drop = lambda m: {k: v for k, v in m.items() if k not in ("train_time_s", "samples_per_s")}  # noqa: E731
    assert drop(a) == drop(b) and drop(a) != drop(c)


class Interrupt(Exception):
    pass


@pytest.mark.parametrize("overrides", [
    {"quantizer.name": "vq", "quantizer.init": "kmeans", "quantizer.warmup_steps": 15},
    {"quantizer.name": "ema", "quantizer.dead_code_threshold": 0.5},
    {"quantizer.name": "simvq", "quantizer.rotation_trick": True},
    {"quantizer.name": "cvq", "quantizer.anchor": "probrandom"},
], ids=["vq-deferred-kmeans", "ema-restarts", "simvq-rotation", "cvq-sampled-anchors"])
def test_checkpoint_resume_equals_uninterrupted(overrides, tmp_path):
    """Killed after a checkpoint, then resumed: the final metrics equal an uninterrupted run."""
    cfg = tiny_config(**{"train.steps": 40, **overrides})
    uninterrupted = train(cfg)

    def die_at_20(m):
        if m["step"] == 20:
            raise Interrupt
    with pytest.raises(Interrupt):
        train(cfg, report=die_at_20, checkpoint_dir=tmp_path)
    assert (tmp_path / CHECKPOINT_FILE).exists()
    resumed = train(cfg, checkpoint_dir=tmp_path)
    for key in {"step", *eval_metrics("vector")} - {"train_time_s", "samples_per_s"}:
        assert resumed[key] == uninterrupted[key], key


def test_checkpoint_loads_with_weights_only(tmp_path):
    """The checkpoint holds only tensors and plain types (torch.load weights_only=True)."""
    train(tiny_config(), checkpoint_dir=tmp_path)
    ckpt = torch.load(tmp_path / CHECKPOINT_FILE, weights_only=True)
    assert ckpt["state"]["step"] == 20 and {"model", "optimizer", "batch_rng", "rng"} <= ckpt.keys()


def test_finished_checkpoint_returns_without_training(tmp_path):
    """Resuming a finished trial returns its final metrics at once, and still hands on_end the
    trained model with the same final code counts."""
    ended = []
    first = train(tiny_config(), checkpoint_dir=tmp_path, on_end=ended.append)
    calls = []
    assert train(tiny_config(), report=calls.append, checkpoint_dir=tmp_path, on_end=ended.append) == first
    assert calls == [] and len(ended) == 2
    assert torch.equal(ended[0].counts, ended[1].counts) and ended[1].metrics == first


def test_on_end_runs_once_before_the_last_report():
    """on_end gets the final metrics and the code counts behind them, before the last report."""
    events = []
    train(tiny_config(), report=lambda m: events.append(("report", m["step"])),
          on_end=lambda t: events.append(("end", t)))
    assert [e[0] for e in events] == ["report", "end", "report"]
    trained = events[1][1]
    used = int((trained.counts > 0).sum())
    assert trained.counts.sum() == 128 and used / 32 == trained.metrics["utilization"]


def test_divergence_raises_with_step_and_last_metrics():
    """A non-finite loss raises Diverged carrying the step and the last evaluated metrics."""
    cfg = tiny_config(**{"train.lr": 1e6, "train.eval_every": 1, "train.steps": 50})
    reports = []
    with pytest.raises(Diverged) as err:
        train(cfg, report=reports.append)
    assert err.value.step > 1 and err.value.metrics == reports[-1]
    assert err.value.metrics["step"] == err.value.step - 1


def test_deferred_quantization_initializes_from_mature_latents():
    """warmup + kmeans: codes sit on encoder outputs after warmup, so most of them are used."""
    cfg = tiny_config(**{"quantizer.init": "kmeans", "quantizer.warmup_steps": 20, "train.steps": 21,
                         "train.eval_every": 100, "quantizer.codebook_size": 16})
    deferred = train(cfg)
    random_init = train(cfg.with_overrides(["quantizer.init=random", "quantizer.warmup_steps=0"]))
    assert deferred["utilization"] > random_init["utilization"]


def test_core_imports_no_orchestration():
    """Importing the core and the CLI pulls in no ray, optuna or mlflow."""
    code = ("import sys, vqstudy.train, vqstudy.cli, vqstudy.metrics;"
            "bad = [m for m in ('ray', 'optuna', 'mlflow') if m in sys.modules]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


# -- the loop on a device: no host reads between evaluations, precision, compile -------------
HOST_READS = ("item", "cpu", "tolist", "numpy", "__bool__", "__float__", "__int__")


@pytest.mark.parametrize("name", ["vq", "simvq", "fsq", "lfq"])
def test_no_host_read_between_evaluations(name, monkeypatch):
    """A quickstart-sized trial reads nothing back from its device between evaluations (on
    CUDA each read would wait for the queue to drain): every .item()/.cpu()/... outside the
    evaluation is counted, and the only one allowed per evaluation is the summed loss."""
    import vqstudy.train as core

    reads, evaluating = [], []
    for method in HOST_READS:
        original = getattr(torch.Tensor, method)

        def counted(self, *a, _original=original, _method=method, **k):
            if not evaluating:
                reads.append(_method)
            return _original(self, *a, **k)
        monkeypatch.setattr(torch.Tensor, method, counted)
    real_evaluate = core.evaluate

    def evaluate(*a, **k):
        evaluating.append(True)
        try:
            return real_evaluate(*a, **k)
        finally:
            evaluating.clear()
    monkeypatch.setattr(core, "evaluate", evaluate)
    cfg = tiny_config(**{"quantizer.name": name, "quantizer.codebook_size": 1024, "data.dim": 16,
                         "model.latent_dim": 8, "train.batch_size": 256, "train.steps": 60, "train.eval_every": 20,
                         **({"quantizer.levels": [8, 8, 4, 4]} if name == "fsq" else {})})
    monkeypatch.setattr(core, "prepare", _counting_prepare(core.prepare, reads, evaluating))
    train(cfg)
    assert reads == ["item"] * 3, reads


def _counting_prepare(prepare, reads, evaluating):
    """Model building and data loading happen once, before the loop: not counted."""
    def wrapped(cfg):
        evaluating.append(True)
        try:
            return prepare(cfg)
        finally:
            evaluating.clear()
    return wrapped


def test_bf16_autocasts_the_model_but_not_the_quantizer():
    """train.precision: bf16 runs the encoder in bfloat16 and hands the quantizer float32."""
    cfg = tiny_config(**{"train.precision": "bf16"})
    seen = []
    from vqstudy.models import VQAutoencoder

    original = VQAutoencoder.quantize

    def spy(self, z_e):
        seen.append(z_e.dtype)
        out = original(self, z_e)
        seen.append(out.z_q.dtype)
        return out
    VQAutoencoder.quantize = spy
    try:
        metrics = train(cfg)
    finally:
        VQAutoencoder.quantize = original
    assert torch.bfloat16 in seen[::2] and set(seen[1::2]) == {torch.float32}
    assert torch.isfinite(torch.tensor(metrics["recon_mse"]))


def test_cuda_where_there_is_none_is_a_config_error():
    """train.device: cuda on a machine without CUDA: one ConfigError naming what it has."""
    from vqstudy.errors import ConfigError

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(ConfigError, match=r"train.device: cuda:1 asked but this machine has no CUDA device"):
        train(tiny_config(**{"train.device": "cuda:1"}))


@pytest.mark.slow
def test_compiled_trial_matches_eager():
    """train.compile: the compiled encoder/decoder train to the eager trial's metrics."""
    cfg = tiny_config(**{"train.steps": 20})
    eager, compiled = train(cfg), train(cfg.with_overrides(["train.compile=true"]))
    for key in ("recon_mse", "utilization", "perplexity"):
        assert compiled[key] == pytest.approx(eager[key], rel=1e-3, abs=1e-5), key
