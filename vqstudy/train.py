"""The one training core every trial calls: `train(cfg, report, checkpoint_dir) -> metrics`.

The CLI, the Ray trainable and the tests all call this function; integrations stay out
of it (no ray, optuna or mlflow imports). Adam on recon MSE + the quantizer's named
losses; every `train.eval_every` steps the whole eval set is measured, a checkpoint is
written (if asked) and `report(metrics)` is called, in that order, so a scheduler that
receives the report can attach the checkpoint that matches it. After the last evaluation
(and before its report) `on_end(Trained)` hands the caller the model, data and final code
counts that train() holds anyway, so per-trial figures need no second model or dataset.

On a GPU the small models of a scaling sweep would spend their time waiting, so the loop
keeps the data on the trial's device (moved once; batches indexed there by a generator
that lives there too), reads nothing back between evaluations (the loss is summed on the
device and read at the next one), uses Adam's fused kernel, and takes `train.precision`
(bf16 autocast; the quantizer stays fp32, see devices.py) and `train.compile`.

Deferred quantization ("Early Quantization Shrinks Codebook"): for
`quantizer.warmup_steps` steps the model trains as a continuous autoencoder, then (with
`quantizer.init: kmeans`) the codebook is k-means-initialized on encoder outputs and
quantization begins. `warmup_steps: 0` + `kmeans` is early quantization on an untrained encoder.
"""
from __future__ import annotations

import dataclasses
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from .config import TrialConfig
from .data import Dataset, load_dataset, to_float
from .devices import autocast, resolve, synchronize
from .metrics import EvalAccumulator, codebook_covariance
from .models import VQAutoencoder, build_model

CHECKPOINT_FILE = "checkpoint.pt"
Report = Callable[[dict], None]


@dataclass
class Trained:
    """What a finished train() holds: the model, its data and the final eval's code counts."""
    cfg: TrialConfig
    model: VQAutoencoder
    data: Dataset
    device: torch.device
    counts: torch.Tensor     # (num_codes,) assignments over the whole eval set
    metrics: dict


class Diverged(RuntimeError):
    """A non-finite loss: training stopped at the evaluation of `step`, the loss having become
    non-finite at a step from `since` on; `metrics` are the last evaluated ones."""

    def __init__(self, step: int, metrics: dict, loss: float, since: int | None = None):
        where = f"at step {step}" if since in (None, step) else f"between steps {since} and {step}"
        super().__init__(f"loss became {loss} {where}")
        self.step, self.metrics, self.loss = step, metrics, loss


def get_batch(x: torch.Tensor, batch_size: int, g: torch.Generator) -> torch.Tensor:
    """A random batch of the device-resident set x, indexed on its device by the generator g
    (which lives there too): no host work, no transfer."""
    idx = torch.randint(0, x.shape[0], (batch_size,), generator=g, device=x.device)
    return to_float(x[idx])


def kmeans_sample_size(k: int) -> int:
    """Encoder outputs gathered for the k-means init: 4 per code, within [4,096, 262,144]."""
    return min(max(4 * k, 4096), 2**18)


@torch.no_grad()
def collect_latents(model: VQAutoencoder, x: torch.Tensor, n: int, cfg: TrialConfig, device) -> torch.Tensor:
    """Up to n encoder outputs (n, D) from the training set, in order (deterministic)."""
    model.eval()
    chunks, total = [], 0
    for i in range(0, x.shape[0], cfg.train.eval_batch_size):
        with autocast(device, cfg.train.precision):
            z_e = model.encode(to_float(x[i:i + cfg.train.eval_batch_size]).to(device))
        chunks.append(z_e.reshape(-1, z_e.shape[-1]).float())
        total += chunks[-1].shape[0]
        if total >= n:
            break
    model.train()
    return torch.cat(chunks)[:n]


@torch.no_grad()
def eval_pass(model: VQAutoencoder, data: Dataset, cfg: TrialConfig, device, quantize: bool = True) -> EvalAccumulator:
    """One pass over the whole eval set, accumulated (code counts, moments, errors), in the
    trial's precision: the model is measured as it trains."""
    model.eval()
    acc = EvalAccumulator(model.quantizer.num_codes, cfg.model.latent_dim, data.modality, device)
    for i in range(0, data.eval.shape[0], cfg.train.eval_batch_size):
        x = to_float(data.eval[i:i + cfg.train.eval_batch_size]).to(device)
        with autocast(device, cfg.train.precision):
            z_e = model.encode(x)
            out = model.quantize(z_e)
            x_hat = model.decode(out.z_q if quantize else z_e)
        acc.update(x, x_hat.float(), z_e.float(), out.z_q, out.indices)
    model.train()
    return acc


@torch.no_grad()
def evaluate(model: VQAutoencoder, data: Dataset, cfg: TrialConfig, device, quantize: bool = True) -> tuple[dict, torch.Tensor]:
    """Metrics over the whole eval set (see metrics.py) and the code counts behind them.
    During deferred quantization's warmup (quantize=False) the decoder sees z_e, and the
    code metrics are those the current codebook would give."""
    acc = eval_pass(model, data, cfg, device, quantize)
    return acc.compute(codebook_covariance(model.quantizer)), acc.counts


def checkpoint_step(checkpoint_dir: str | Path) -> int | None:
    """The step a checkpoint folder was written at (None when it holds none)."""
    path = Path(checkpoint_dir) / CHECKPOINT_FILE
    if not path.exists():
        return None
    return int(torch.load(path, map_location="cpu", weights_only=True)["state"]["step"])


def save_checkpoint(path: Path, state: dict) -> None:
    """Write atomically: a crash mid-write leaves the previous checkpoint intact."""
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def _rng_state() -> dict:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["cpu"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


def total_loss(model: VQAutoencoder, x: torch.Tensor, quantize: bool, precision: str = "fp32") -> torch.Tensor:
    """Reconstruction MSE plus the quantizer's named losses (none during the warmup)."""
    with autocast(x.device, precision):
        x_hat, _, out = model(x, quantize=quantize)
        loss = F.mse_loss(x_hat.float(), x)
    return loss + sum(out.losses.values()) if out is not None else loss


def _restore(ckpt_path: Path | None, model, opt, batches: torch.Generator, device, state: dict) -> dict:
    """Load a checkpoint into model, optimizer and RNGs; returns the loop state it saved."""
    if not (ckpt_path and ckpt_path.exists()):
        return state
    ckpt = torch.load(ckpt_path, map_location=device, weights_only=True)
    model.load_state_dict(ckpt["model"])
    opt.load_state_dict(ckpt["optimizer"])
    batches.set_state(ckpt["batch_rng"].cpu())     # generator states are CPU byte tensors, also CUDA's
    _set_rng_state(ckpt["rng"])
    return ckpt["state"]


def _save(ckpt_path: Path, model, opt, batches: torch.Generator, state: dict) -> None:
    ckpt_path.parent.mkdir(parents=True, exist_ok=True)
    save_checkpoint(ckpt_path, {"model": model.state_dict(), "optimizer": opt.state_dict(),
                                "batch_rng": batches.get_state(), "rng": _rng_state(), "state": state})


class Window:
    """The steps since the last evaluation: their loss, summed on the device, and their time."""

    def __init__(self, device: torch.device, step: int):
        self.device, self.loss = device, torch.zeros((), device=device)
        self.reset(step)

    def add(self, loss: torch.Tensor) -> None:
        self.loss += loss.detach()

    def close(self, step: int, metrics: dict) -> tuple[float, float]:
        """(mean loss, seconds) of the steps up to `step`: the one read from the device per
        evaluation; Diverged (with the last evaluated `metrics`) when the loss is not finite."""
        synchronize(self.device)
        seconds = time.perf_counter() - self.start
        mean = self.loss.item() / (step - self.first + 1)
        if not math.isfinite(mean):
            raise Diverged(step, metrics, mean, self.first)
        return mean, seconds

    def reset(self, step: int) -> None:
        self.loss.zero_()
        self.start, self.first = time.perf_counter(), step + 1


def prepare(cfg: TrialConfig) -> tuple[VQAutoencoder, Dataset, torch.device]:
    """The trial's model and data, both on its device (the data moved once; every batch is
    then indexed there), the encoder and decoder compiled if asked."""
    device = resolve(cfg.train.device)
    torch.manual_seed(cfg.train.seed)
    data = load_dataset(cfg.data)
    data = dataclasses.replace(data, train=data.train.to(device), eval=data.eval.to(device))
    model = build_model(cfg, data).to(device)
    if cfg.train.compile:   # the quantizer stays eager: its chunked searches and restarts are data-dependent
        model.encoder.compile()
        model.decoder.compile()
    return model, data, device


def train(cfg: TrialConfig, report: Report | None = None, checkpoint_dir: str | Path | None = None,
          on_end: Callable[[Trained], None] | None = None) -> dict:
    """Train one trial and return its final metrics. Resumes from `checkpoint_dir` when a
    checkpoint is there, ending with the same metrics as an uninterrupted run (CPU).
    `on_end` runs once, after the last evaluation and before its report (a scheduler may
    stop the trial inside that report), also when a checkpoint of the last step is resumed.

    Between evaluations nothing waits for the device: the loss is summed where it is computed
    and read at the next evaluation, which is where a non-finite loss is caught (so a
    diverged trial stops at the evaluation after it diverged, having written no checkpoint
    since)."""
    tc, qc = cfg.train, cfg.quantizer
    model, data, device = prepare(cfg)
    # fused: one kernel for all parameters, its step counters on the device (no host reads)
    opt = torch.optim.Adam(model.parameters(), lr=tc.lr, fused=device.type in ("cpu", "cuda") or None)
    batches = torch.Generator(device=device).manual_seed(tc.seed)
    ckpt_path = Path(checkpoint_dir) / CHECKPOINT_FILE if checkpoint_dir else None
    state = _restore(ckpt_path, model, opt, batches, device,
                     {"step": 0, "metrics": {}, "codebook_initialized": qc.init != "kmeans",
                      "train_time_s": 0.0, "step_time_s": 0.0})

    metrics, counts = state["metrics"], None
    wall_start, wall_before = time.perf_counter(), state["train_time_s"]
    window = Window(device, state["step"])
    while state["step"] < tc.steps:
        quantize = state["step"] >= qc.warmup_steps
        if quantize and not state["codebook_initialized"]:  # deferred (or early) k-means init
            z = collect_latents(model, data.train, kmeans_sample_size(qc.codebook_size), cfg, device)
            model.quantizer.init_from_data(z, qc.kmeans_iters)
            state["codebook_initialized"] = True

        loss = total_loss(model, get_batch(data.train, tc.batch_size, batches), quantize, tc.precision)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        window.add(loss)
        state["step"] += 1

        if state["step"] % tc.eval_every == 0 or state["step"] == tc.steps:
            train_loss, seconds = window.close(state["step"], metrics)
            state["step_time_s"] += seconds
            evaluated, counts = evaluate(model, data, cfg, device, quantize)
            if not math.isfinite(evaluated["recon_mse"]):
                raise Diverged(state["step"], metrics, evaluated["recon_mse"], window.first)
            state["train_time_s"] = wall_before + time.perf_counter() - wall_start
            metrics = {"step": state["step"], "train_loss": train_loss, **evaluated,
                       "train_time_s": state["train_time_s"],
                       "samples_per_s": state["step"] * tc.batch_size / max(state["step_time_s"], 1e-9)}
            state["metrics"] = metrics
            if ckpt_path:
                _save(ckpt_path, model, opt, batches, state)
            if on_end and state["step"] == tc.steps:
                on_end(Trained(cfg, model, data, device, counts, dict(metrics)))
            if report:
                report(dict(metrics))
            window.reset(state["step"])
    if on_end and counts is None:  # resumed at the last step: nothing trained, nothing reported
        counts = eval_pass(model, data, cfg, device).counts
        on_end(Trained(cfg, model, data, device, counts, dict(metrics)))
    return metrics
