"""The modality table: what each kind of data needs from the shared core.

A dataset names its modality (registry.py); the model, the metrics and the per-trial
figures look the modality up here instead of testing `kind` strings. Adding a modality
(1-D audio next) is one entry: the builder of its encoder/decoder pair and what applies
to it. Builders are 'module:function' paths, imported on first use, so this table costs
nothing to read during validation.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Modality:
    name: str
    example: str                    # the shape of one example, for the docs
    autoencoder: str                # 'module:function' (cfg: TrialConfig, example_shape) -> (encoder, decoder)
    figures: tuple[str, ...] = ()   # per-trial figures besides code usage: 'module:function' (trained, out_dir, title) -> Path

    # Encoders output channel-first maps (B, D, *grid); the quantizer sees channel-last (B, *grid, D).


MODALITIES: dict[str, Modality] = {
    "vector": Modality("vector", "(n,) float vector", "vqstudy.models:mlp_autoencoder"),
    "image": Modality("image", "(C, H, W) uint8 pixels, scaled to [0, 1]", "vqstudy.models:conv_autoencoder",
                      figures=("vqstudy.figures:reconstruction_grid",)),
}
