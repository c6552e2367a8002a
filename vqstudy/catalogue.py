"""The metrics catalogue: every number a trial reports, described once.

Training computes them (metrics.py, train.py), and everything downstream reads this table
instead of keeping its own list: which metrics a study may optimize (`sweep.metric`) and in
which direction, what MLflow logs at each evaluation and what only at the end, the Parquet
column types of the results table, the columns of the trial table and the progress line (`headline`),
and the axis labels of the figures. Adding a metric is one entry here plus the code that
computes it. No torch, no Ray: validation reads it in a tenth of a second.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Metric:
    name: str
    doc: str
    label: str                                # axis label in figures
    direction: str | None = None              # "min" / "max": a study may optimize it; None: a measurement
    unit: str = ""
    dtype: str = "float64"                    # Parquet type of its results column ("int64" for counts)
    per_eval: bool = True                     # logged at every evaluation (False: once, when the trial ends)
    modalities: tuple[str, ...] | None = None  # None: every modality
    headline: bool = False                    # shown in the trial table and each progress line

    def applies_to(self, modality: str) -> bool:
        return self.modalities is None or modality in self.modalities


_ALL = [
    Metric("recon_mse", "mean squared reconstruction error per element (images in [0, 1])",
           "reconstruction MSE (per element)", "min", headline=True),
    Metric("psnr", "images only: mean over images of 10·log10(1/MSE)", "PSNR (dB)", "max", unit="dB",
           modalities=("image",)),
    Metric("utilization", "fraction of the K codes used at least once",
           "codebook utilization (fraction of codes used)", "max", headline=True),
    Metric("dead_codes", "K − codes used", "unused codes", "min", dtype="int64"),
    Metric("num_codes", "K as the quantizer has it (`fsq`: the product of its levels, e.g. 1000 at "
           "`codebook_size` 1024)", "codes in the codebook", dtype="int64"),
    Metric("perplexity", "exp(entropy) of the code-usage distribution", "code perplexity", "max",
           headline=True),
    Metric("normalized_entropy", "entropy / log K (1 = uniform use)", "normalized code entropy", "max"),
    Metric("quant_error", "mean ‖z_e − z_q‖² per vector", "quantization error ‖z_e − z_q‖²", "min"),
    Metric("effective_dim", "principal components of the encoder outputs covering 99% of their variance "
           "(embedding collapse)", "effective dim of encoder outputs (PCs for 99% var.)", "max"),
    Metric("codebook_effective_dim", "the same for the codes", "effective dim of the codes (PCs for 99% var.)",
           "max"),
    Metric("train_loss", "mean total training loss over the steps since the last evaluation", "training loss", "min"),
    Metric("train_time_s", "wall time of the trial's training so far", "training time (s)", unit="s"),
    Metric("samples_per_s", "training throughput", "training samples / s", unit="1/s"),
    Metric("reporting_time_s", "time the trial spent in MLflow writes and Tune reports", "reporting time (s)",
           unit="s", per_eval=False),
    Metric("artifacts_time_s", "time the trial spent drawing and logging its figures", "figures time (s)",
           unit="s", per_eval=False),
]
METRICS: dict[str, Metric] = {m.name: m for m in _ALL}

# What a study may optimize or stop on (sweep.metric): the metrics with a direction.
OBJECTIVES: tuple[str, ...] = tuple(m.name for m in _ALL if m.direction)
HEADLINE: tuple[str, ...] = tuple(m.name for m in _ALL if m.headline)


def eval_metrics(modality: str) -> list[str]:
    """The metrics train() reports at each evaluation for data of `modality` (besides `step`)."""
    return [m.name for m in _ALL if m.per_eval and m.applies_to(modality)]


def label(key: str) -> str:
    """A figure's axis label for a metric (the key itself for anything else)."""
    return METRICS[key].label if key in METRICS else key

