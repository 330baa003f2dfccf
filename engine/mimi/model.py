"""Mimi, Kyutai's streaming speech codec: 24 kHz audio ↔ 12.5 Hz frames of discrete codes.

Encode: SEANet encoder (25 Hz latent) → transformer → stride-2 conv (12.5 Hz) → split RVQ.
Decode: RVQ codewords → depthwise stride-2 transposed conv (25 Hz) → transformer → SEANet decoder.

Outside ``with mimi.streaming(B):`` each call sees a whole signal; inside, calls continue one
stream per batch slot, frame by frame. The encoder and the decoder keep separate states, so
one instance can encode the microphone and decode the model's voice at the same time.

With ``exact_codes=True`` (``--exact``) encoding runs the very kernels the reference runs, so
the codes are bit-identical (a codeword near-tie flips on a 1e-6 change of the latent). Decoding
only has to sound the same: its weight-heavy products use the layouts MKL streams fastest, which
round differently (audio within about 1e-5 of the reference). ``exact_codes=False``, the default
on a CPU (``loading.exact_codes_on``), lets encoding use them too (8 % less time on an Intel
Xeon with AMX, 40 % less on an AMD EPYC), but near-ties then flip codes now and then (measured
on speech: none of 18,240 codewords on an Intel Xeon in either layout; 1 frame in 3000 from
codebook 17 of 32 on an AMD EPYC, none in the first 8). It also decodes from bfloat16 weights
where the CPU multiplies them itself (AMX, AVX512-BF16), which reads half the bytes: the audio
then stays within about 1 % of the peak of the fp32 decoding's (44 dB signal to difference on
speech).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from audio import FRAME_RATE, SAMPLE_RATE

from ..conv import Nested, StreamingConv1d, StreamingConvTranspose1d
from ..errors import CheckpointError, EngineError
from ..quantizer import QuantizerConfig, SplitResidualVQ
from ..seanet import SEANetConfig, SEANetDecoder, SEANetEncoder
from ..streaming import StreamingModule
from ..transformer import TransformerConfig
from .transformer import MimiTransformer

# The only values our modules implement, as spelled in the reference's config dicts.
_FIXED_SEANET = {"causal": True, "activation": "ELU", "norm": "none", "pad_mode": "constant", "true_skip": True,
                 "disable_norm_outer_blocks": 0}
_FIXED_TRANSFORMER = {"causal": True, "conv_layout": True, "gating": "none", "norm": "layer_norm",
                      "positional_embedding": "rope"}
_LAYER_SCALE_INIT = 0.01


@dataclasses.dataclass
class MimiConfig:
    seanet: SEANetConfig
    quantizer: QuantizerConfig
    transformer: TransformerConfig
    sample_rate: int = SAMPLE_RATE
    channels: int = 1
    frame_rate: float = FRAME_RATE

    @classmethod
    def official(cls) -> MimiConfig:
        """The released codec (``tokenizer-e351c8d8-checkpoint125.safetensors``)."""
        return cls(
            seanet=SEANetConfig(),
            quantizer=QuantizerConfig(),
            transformer=_mimi_transformer(dim=512, num_heads=8, num_layers=8, ffn_hidden=2048),
        )

    @classmethod
    def tiny(cls) -> MimiConfig:
        """Same rates, frame, codebook count and layer layout as the released codec; 1.7 M values, not 96 M."""
        return cls(
            seanet=SEANetConfig(dimension=64, n_filters=8),
            quantizer=QuantizerConfig(dimension=16, input_dimension=64, output_dimension=64),
            transformer=_mimi_transformer(dim=64, num_heads=4, num_layers=2, ffn_hidden=128),
        )

    @property
    def frame_size(self) -> int:
        return int(self.sample_rate / self.frame_rate)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> MimiConfig:
        """Read the reference's Mimi config format (``loaders._mimi_config``, ``mimi_config_name`` files)."""
        try:
            seanet, quantizer, transformer = dict(raw["seanet"]), dict(raw["quantizer"]), dict(raw["transformer"])
            _check_fixed("seanet", seanet, _FIXED_SEANET)
            _check_fixed("transformer", transformer, _FIXED_TRANSFORMER)
            dim = transformer["d_model"]
            if transformer.get("input_dimension", dim) != dim or transformer.get("output_dimensions", [dim]) != [dim]:
                raise CheckpointError("Mimi config: transformer projections are not supported "
                                      "(input_dimension and output_dimensions must equal d_model)")
            cfg = cls(
                seanet=SEANetConfig(**{f.name: seanet[f.name] for f in dataclasses.fields(SEANetConfig)}),
                quantizer=QuantizerConfig(**{f.name: quantizer[f.name] for f in dataclasses.fields(QuantizerConfig)}),
                transformer=TransformerConfig(
                    dim=dim,
                    num_heads=transformer["num_heads"],
                    num_layers=transformer["num_layers"],
                    ffn_hidden=transformer["dim_feedforward"],
                    context=transformer["context"],
                    norm="layer_norm",
                    ffn="gelu",
                    max_period=float(transformer["max_period"]),
                    layer_scale=transformer["layer_scale"] is not None,
                ),
                sample_rate=raw["sample_rate"],
                channels=raw["channels"],
                frame_rate=raw["frame_rate"],
            )
        except KeyError as exc:
            raise CheckpointError(f"Mimi config: missing key {exc.args[0]!r}") from None
        except TypeError as exc:
            raise CheckpointError(f"Mimi config: bad value ({exc})") from None
        cfg.validate()
        return cfg

    def to_dict(self) -> dict[str, Any]:
        """The reference's format, which ``moshi.models.loaders.get_mimi(path, mimi_config=...)`` accepts."""
        tr = self.transformer
        return {
            "sample_rate": self.sample_rate,
            "channels": self.channels,
            "frame_rate": self.frame_rate,
            "seanet": {**dataclasses.asdict(self.seanet), **_FIXED_SEANET},
            "quantizer": dataclasses.asdict(self.quantizer),
            "transformer": {
                "d_model": tr.dim,
                "num_heads": tr.num_heads,
                "num_layers": tr.num_layers,
                "dim_feedforward": tr.ffn_hidden,
                "context": tr.context,
                "max_period": tr.max_period,
                "layer_scale": _LAYER_SCALE_INIT if tr.layer_scale else None,
                "input_dimension": tr.dim,
                "output_dimensions": [tr.dim],
                **_FIXED_TRANSFORMER,
            },
        }

    def validate(self) -> None:
        hop = self.seanet.hop_length
        stride = self.frame_size / hop
        if self.sample_rate % hop or stride != int(stride) or stride < 1:
            raise CheckpointError(
                f"Mimi config: a frame of {self.frame_size} samples is not a whole number of SEANet hops ({hop})"
            )
        if self.transformer.dim != self.seanet.dimension or self.quantizer.input_dimension != self.seanet.dimension:
            raise CheckpointError("Mimi config: transformer d_model and quantizer input_dimension "
                                  "must equal seanet dimension")
        if self.quantizer.n_q < 2:
            raise CheckpointError("Mimi config: the split quantizer needs n_q >= 2")


def _mimi_transformer(dim: int, num_heads: int, num_layers: int, ffn_hidden: int) -> TransformerConfig:
    return TransformerConfig(dim, num_heads, num_layers, ffn_hidden, context=250, norm="layer_norm", ffn="gelu",
                             layer_scale=True)


def _check_fixed(group: str, values: dict[str, Any], fixed: dict[str, Any]) -> None:
    for key, expected in fixed.items():
        if key in values and values[key] != expected:
            raise CheckpointError(f"Mimi config: {group}.{key} = {values[key]!r} is not supported "
                                  f"(only {expected!r})")


class Mimi(StreamingModule):
    def __init__(self, cfg: MimiConfig, exact_codes: bool = True):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.sample_rate = cfg.sample_rate
        self.channels = cfg.channels
        self.frame_rate = cfg.frame_rate
        self.frame_size = cfg.frame_size
        dim = cfg.seanet.dimension
        stride = cfg.frame_size // cfg.seanet.hop_length
        self.encoder = SEANetEncoder(cfg.seanet, exact=exact_codes)
        self.decoder = SEANetDecoder(cfg.seanet, exact=False, half=not exact_codes)
        self.encoder_transformer = MimiTransformer(cfg.transformer, exact=exact_codes)
        self.decoder_transformer = MimiTransformer(cfg.transformer, exact=False, half=not exact_codes)
        self.quantizer = SplitResidualVQ(cfg.quantizer, exact=exact_codes)
        self.downsample = Nested(
            "conv", StreamingConv1d(dim, dim, 2 * stride, stride, bias=False, replicate=True, exact=exact_codes)
        )
        # Depthwise: the released model was trained with this ("upsample_channel_wise_bug").
        self.upsample = Nested(
            "convtr", StreamingConvTranspose1d(dim, dim, 2 * stride, stride, groups=dim, bias=False)
        )

    @property
    def num_codebooks(self) -> int:
        return self.quantizer.num_codebooks

    @property
    def total_codebooks(self) -> int:
        return self.quantizer.total_codebooks

    def set_num_codebooks(self, n: int) -> None:
        if not 1 <= n <= self.total_codebooks:
            raise EngineError(f"Mimi has {self.total_codebooks} codebooks; cannot use {n}")
        self.quantizer.set_num_codebooks(n)

    def encode(self, wav: torch.Tensor) -> torch.Tensor:
        """Audio ``[B, channels, T]`` at ``sample_rate`` → codes ``[B, num_codebooks, frames]``.

        A whole signal is zero-padded on the right to full frames. While streaming, ``T`` must be
        a positive multiple of ``frame_size``: buffering partial frames is the caller's job.
        """
        if wav.dim() != 3 or wav.shape[1] != self.channels or not wav.is_floating_point():
            raise EngineError(f"Mimi encodes float audio shaped [batch, {self.channels}, samples], "
                              f"got {wav.dtype} {tuple(wav.shape)}")
        length = wav.shape[-1]
        if self.is_streaming:
            if length == 0 or length % self.frame_size:
                raise EngineError(f"streaming Mimi takes whole frames: {length} samples is not a positive "
                                  f"multiple of {self.frame_size}")
        else:
            if length == 0:
                raise EngineError("Mimi cannot encode an empty signal")
            wav = F.pad(wav, (0, math.ceil(length / self.frame_size) * self.frame_size - length))
        latent = self.encoder(wav)
        latent = self.encoder_transformer(latent)
        latent = self.downsample(latent)
        return self.quantizer.encode(latent)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes ``[B, K, frames]`` (any 1 ≤ K ≤ total_codebooks) → audio ``[B, channels, frames·frame_size]``."""
        if codes.dim() != 3 or codes.is_floating_point() or not 1 <= codes.shape[1] <= self.total_codebooks:
            raise EngineError(f"Mimi decodes integer codes shaped [batch, 1..{self.total_codebooks}, frames], "
                              f"got {codes.dtype} {tuple(codes.shape)}")
        if codes.shape[-1] == 0:
            raise EngineError("Mimi cannot decode zero frames")
        latent = self.quantizer.decode(codes)
        latent = self.upsample(latent)
        latent = self.decoder_transformer(latent)
        return self.decoder(latent)
