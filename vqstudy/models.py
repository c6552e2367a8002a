"""The VQ autoencoder: encoder -> quantizer -> decoder, with the capacity knobs the
collapse studies sweep (`model.encoder_width`, `model.encoder_depth`, `model.latent_dim`).

The encoder/decoder pair comes from the data's modality (modalities.py): images get a conv
pair (stride-2 stages, residual blocks at the latent grid), vectors an MLP pair. Encoders
output channel-first maps (B, D, *grid) of any grid rank; the autoencoder moves D last for
the quantizer, so one class serves every modality. The decoder has its own width/depth so that sweeping the encoder ("Early
Quantization Shrinks Codebook": small encoders cause embedding collapse) holds it fixed.
"""
from __future__ import annotations

import dataclasses

import torch
from torch import Tensor, nn

from .config import TrialConfig
from .data import Dataset
from .errors import ConfigError
from .modalities import MODALITIES
from .quantizers import QuantOut, build_quantizer, options_of
from .registry import load


class ResBlock(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.net = nn.Sequential(nn.ReLU(), nn.Conv2d(ch, ch, 3, padding=1), nn.ReLU(), nn.Conv2d(ch, ch, 1))

    def forward(self, x: Tensor) -> Tensor:
        return x + self.net(x)


def conv_encoder(in_ch: int, width: int, depth: int, downsample: int, latent_dim: int) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Conv2d(in_ch, width, 3, padding=1)]
    for _ in range(downsample):
        layers += [nn.ReLU(), nn.Conv2d(width, width, 4, stride=2, padding=1)]   # halves H, W
    layers += [ResBlock(width) for _ in range(depth)]
    layers += [nn.ReLU(), nn.Conv2d(width, latent_dim, 1)]
    return nn.Sequential(*layers)


def conv_decoder(latent_dim: int, width: int, depth: int, downsample: int, out_ch: int) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Conv2d(latent_dim, width, 3, padding=1)]
    layers += [ResBlock(width) for _ in range(depth)]
    for _ in range(downsample):
        layers += [nn.ReLU(), nn.ConvTranspose2d(width, width, 4, stride=2, padding=1)]  # doubles H, W
    layers += [nn.ReLU(), nn.Conv2d(width, out_ch, 3, padding=1)]
    return nn.Sequential(*layers)


def mlp(n_in: int, width: int, depth: int, n_out: int) -> nn.Sequential:
    """`depth` hidden layers of `width` units; depth 0 is a single linear map."""
    dims = [n_in] + [width] * depth
    layers: list[nn.Module] = []
    for a, b in zip(dims[:-1], dims[1:]):
        layers += [nn.Linear(a, b), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(dims[-1], n_out))


def mlp_autoencoder(cfg: TrialConfig, example_shape: tuple[int, ...]) -> tuple[nn.Module, nn.Module]:
    """Vectors (n,): MLP encoder and decoder."""
    m, (n,) = cfg.model, example_shape
    return mlp(n, m.encoder_width, m.encoder_depth, m.latent_dim), mlp(m.latent_dim, m.decoder_width, m.decoder_depth, n)


def conv_autoencoder(cfg: TrialConfig, example_shape: tuple[int, ...]) -> tuple[nn.Module, nn.Module]:
    """Images (C, H, W): conv encoder and decoder; the sides must survive the stride-2 stages."""
    m, (ch, h, w) = cfg.model, example_shape
    stride = 2**m.downsample
    if h % stride or w % stride:
        raise ConfigError(f"model.downsample: {m.downsample} stride-2 stages need image sides divisible by "
                          f"{stride}; {cfg.data.name} images are {h}x{w}")
    return (conv_encoder(ch, m.encoder_width, m.encoder_depth, m.downsample, m.latent_dim),
            conv_decoder(m.latent_dim, m.decoder_width, m.decoder_depth, m.downsample, ch))


class VQAutoencoder(nn.Module):
    def __init__(self, encoder: nn.Module, quantizer: nn.Module, decoder: nn.Module):
        super().__init__()
        self.encoder, self.quantizer, self.decoder = encoder, quantizer, decoder

    def encode(self, x: Tensor) -> Tensor:
        """x -> z_e, channel-last: (B, *grid, D); (B, h, w, D) for images, (B, D) for vectors."""
        return self.encoder(x).movedim(1, -1)

    def decode(self, z_q: Tensor) -> Tensor:
        return self.decoder(z_q.movedim(-1, 1))

    def quantize(self, z_e: Tensor) -> QuantOut:
        """The quantizer, in float32 also under bf16 autocast (see devices.py for why)."""
        with torch.autocast(z_e.device.type, enabled=False):
            return self.quantizer(z_e.float())

    def forward(self, x: Tensor, quantize: bool = True) -> tuple[Tensor, Tensor, QuantOut | None]:
        """Returns (x_hat, z_e, quantizer output). With quantize=False (deferred
        quantization's warmup) the quantizer is skipped and the decoder sees z_e."""
        z_e = self.encode(x)
        out = self.quantize(z_e) if quantize else None
        x_hat = self.decode(out.z_q if out is not None else z_e)
        return x_hat, z_e, out


def quantizer_options(cfg: TrialConfig) -> dict:
    """The `quantizer.*` values the chosen quantizer takes as options (others are ignored,
    so one study can sweep quantizer.name over methods with different options)."""
    values = dataclasses.asdict(cfg.quantizer)
    return {k: values[k] for k in options_of(cfg.quantizer.name) if k in values}


def build_model(cfg: TrialConfig, data: Dataset) -> VQAutoencoder:
    """The autoencoder of `cfg` for `data`: its modality's encoder/decoder around the quantizer."""
    m, q = cfg.model, cfg.quantizer
    quantizer = build_quantizer(q.name, dim=m.latent_dim, codebook_size=q.codebook_size, **quantizer_options(cfg))
    encoder, decoder = load(MODALITIES[data.modality].autoencoder)(cfg, data.example_shape)
    return VQAutoencoder(encoder, quantizer, decoder)
