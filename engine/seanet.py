"""SEANet: Mimi's convolutional encoder (waveform → latent) and decoder (latent → waveform).

The layers sit in one ``nn.Sequential`` called ``model`` whose indices, ELUs included, are the
official checkpoint's (``encoder.model.3.conv.conv.weight``). ``exact`` chooses the conv kernels
and ``half`` the decoder's bfloat16 weights (see ``conv.py``): the encoder's output decides the
codes, so ``--exact`` keeps it bit-exact.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from .conv import StreamingConv1d, StreamingConvTranspose1d


@dataclass
class SEANetConfig:
    channels: int = 1
    dimension: int = 512
    n_filters: int = 64
    ratios: list[int] = field(default_factory=lambda: [8, 6, 5, 4])  # decoder order; the encoder reverses it
    kernel_size: int = 7
    last_kernel_size: int = 3
    residual_kernel_size: int = 3
    n_residual_layers: int = 1
    dilation_base: int = 2
    compress: int = 2

    @property
    def hop_length(self) -> int:
        hop = 1
        for ratio in self.ratios:
            hop *= ratio
        return hop


class ResidualBlock(nn.Module):
    """Pre-activation residual: ``x + conv_1(ELU(conv_k(ELU(x))))`` with an identity shortcut."""

    def __init__(self, dim: int, kernel_size: int, dilation: int, compress: int, exact: bool, half: bool):
        super().__init__()
        hidden = dim // compress
        self.block = nn.Sequential(
            nn.ELU(),
            StreamingConv1d(dim, hidden, kernel_size, dilation=dilation, exact=exact, half=half),
            nn.ELU(),
            StreamingConv1d(hidden, dim, 1, exact=exact, half=half),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.block(x)


def _residual_blocks(cfg: SEANetConfig, dim: int, exact: bool, half: bool = False) -> list[nn.Module]:
    return [
        ResidualBlock(dim, cfg.residual_kernel_size, cfg.dilation_base**j, cfg.compress, exact, half)
        for j in range(cfg.n_residual_layers)
    ]


class SEANetEncoder(nn.Module):
    def __init__(self, cfg: SEANetConfig, exact: bool = True):
        super().__init__()
        width = cfg.n_filters
        layers: list[nn.Module] = [StreamingConv1d(cfg.channels, width, cfg.kernel_size, exact=exact)]
        for ratio in reversed(cfg.ratios):
            layers += _residual_blocks(cfg, width, exact)
            layers += [nn.ELU(), StreamingConv1d(width, 2 * width, 2 * ratio, stride=ratio, exact=exact)]
            width *= 2
        layers += [nn.ELU(), StreamingConv1d(width, cfg.dimension, cfg.last_kernel_size, exact=exact)]
        self.model = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


class SEANetDecoder(nn.Module):
    def __init__(self, cfg: SEANetConfig, exact: bool = True, half: bool = False):
        super().__init__()
        width = cfg.n_filters * 2 ** len(cfg.ratios)
        layers: list[nn.Module] = [StreamingConv1d(cfg.dimension, width, cfg.kernel_size, exact=exact, half=half)]
        for ratio in cfg.ratios:
            layers += [nn.ELU(), StreamingConvTranspose1d(width, width // 2, 2 * ratio, stride=ratio, exact=exact,
                                                          half=half)]
            width //= 2
            layers += _residual_blocks(cfg, width, exact, half)
        layers += [nn.ELU(), StreamingConv1d(width, cfg.channels, cfg.last_kernel_size, exact=exact, half=half)]
        self.model = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.model(z)
