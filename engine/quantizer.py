"""Mimi's split residual vector quantizer.

Two RVQs quantise the same latent, each through its own 1×1 input projection: ``rvq_first``
holds the semantic codebook, ``rvq_rest`` the acoustic ones. The acoustic RVQ does not see the
semantic residual. Decoding sums each RVQ's codewords before its own output projection.

The nearest codeword is found with the very arithmetic of ``torch.cdist`` (which the reference
calls) and the residual is kept as ``[B, D, T]`` as there, so that near-ties between codewords
resolve the same way and the codes are bit-identical. With ``exact=False`` it is the smallest
``‖c‖² − 2x·c`` instead (no square root, one fused product: a third less time a codebook), which
rounds differently and so may resolve a near-tie the other way.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .conv import Nested

_MIN_USAGE = 1e-5
# torch.cdist switches to its matrix-product formula above this many rows on either side.
_CDIST_MM_MIN_ROWS = 26


@dataclass
class QuantizerConfig:
    dimension: int = 256  # codeword size
    n_q: int = 32  # codebooks stored: 1 semantic + n_q - 1 acoustic
    bins: int = 2048  # codewords per codebook
    input_dimension: int = 512
    output_dimension: int = 512


class Codebook(nn.Module):
    """The checkpoint stores running sums; the codewords are ``embedding_sum / usage``."""

    def __init__(self, dim: int, bins: int):
        super().__init__()
        self.register_buffer("_initialized", torch.zeros(1))
        self.register_buffer("cluster_usage", torch.ones(bins))
        self.register_buffer("embedding_sum", torch.zeros(bins, dim))
        self.register_buffer("embedding", torch.zeros(bins, dim), persistent=False)
        self.register_buffer("augmented", torch.zeros(1, bins, dim + 2), persistent=False)
        self.register_buffer("norms", torch.zeros(bins), persistent=False)

    def refresh(self) -> None:
        """Recompute the codewords from the loaded sums (call after loading weights)."""
        self.embedding = self.embedding_sum / self.cluster_usage.clamp(min=_MIN_USAGE)[:, None]
        # torch.cdist computes ‖x‖² − 2x·c + ‖c‖² as one product of augmented rows
        # [−2x, ‖x‖², 1]·[c, 1, ‖c‖²]. The codebook's side, which cdist rebuilds on every call (most
        # of its cost here), is built once, by the same operations, so the distances are the same bits.
        embedding = self.embedding[None]
        norms = embedding.pow(2).sum(-1, keepdim=True)
        self.augmented = torch.cat([embedding, torch.ones_like(norms), norms], dim=-1)
        self.norms = norms[0, :, 0]

    def nearest(self, vectors: torch.Tensor, exact: bool = True) -> torch.Tensor:
        """Index of the closest codeword to each row of ``vectors [N, dim]``, as cdist + argmin gives
        it (``exact``), or from ``‖c‖² − 2x·c``."""
        if not exact:
            return torch.addmm(self.norms, vectors, self.embedding.t(), alpha=-2).argmin(dim=-1)
        if vectors.shape[0] < _CDIST_MM_MIN_ROWS and self.embedding.shape[0] < _CDIST_MM_MIN_ROWS:
            return torch.cdist(vectors[None], self.embedding[None], p=2)[0].argmin(dim=-1)
        x = vectors[None]
        norms = x.pow(2).sum(-1, keepdim=True)
        augmented = torch.cat([x.mul(-2), norms, torch.ones_like(norms)], dim=-1)
        distances = augmented.matmul(self.augmented.mT).clamp_min_(0).sqrt_()
        return distances[0].argmin(dim=-1)


class ResidualVQ(nn.Module):
    def __init__(self, cfg: QuantizerConfig, n_q: int, exact: bool = True):
        super().__init__()
        self.exact = exact
        self.input_proj = nn.Conv1d(cfg.input_dimension, cfg.dimension, 1, bias=False)
        self.output_proj = nn.Conv1d(cfg.dimension, cfg.output_dimension, 1, bias=False)
        # Bare containers, only to give the official key names: vq.layers.N._codebook.embedding_sum
        self.vq = nn.Module()
        self.vq.layers = nn.ModuleList(Nested("_codebook", Codebook(cfg.dimension, cfg.bins)) for _ in range(n_q))
        self.n_q = n_q

    @property
    def codebooks(self) -> list[Codebook]:
        return [layer._codebook for layer in self.vq.layers]

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Latent ``[B, C, T]`` → codes ``[B, n_q, T]``."""
        residual = self.input_proj(x)
        B, D, T = residual.shape
        codes = []
        for codebook in self.codebooks[: self.n_q]:
            code = codebook.nearest(residual.transpose(1, 2).reshape(-1, D), self.exact).view(B, T)
            residual = residual - F.embedding(code, codebook.embedding).transpose(1, 2)
            codes.append(code)
        return torch.stack(codes, dim=1)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes ``[B, K, T]`` → latent ``[B, C, T]``: codewords summed, then projected."""
        quantized = None
        for k, codebook in enumerate(self.codebooks[: codes.shape[1]]):
            codeword = F.embedding(codes[:, k], codebook.embedding).transpose(1, 2)
            quantized = codeword if quantized is None else quantized + codeword
        return self.output_proj(quantized)


class SplitResidualVQ(nn.Module):
    def __init__(self, cfg: QuantizerConfig, exact: bool = True):
        super().__init__()
        self.rvq_first = ResidualVQ(cfg, 1, exact)
        self.rvq_rest = ResidualVQ(cfg, cfg.n_q - 1, exact)
        self.total_codebooks = cfg.n_q

    @property
    def num_codebooks(self) -> int:
        return 1 + self.rvq_rest.n_q

    def set_num_codebooks(self, n: int) -> None:
        self.rvq_rest.n_q = n - 1

    def refresh(self) -> None:
        for codebook in self.rvq_first.codebooks + self.rvq_rest.codebooks:
            codebook.refresh()

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        codes = self.rvq_first.encode(x)
        if self.rvq_rest.n_q:
            codes = torch.cat([codes, self.rvq_rest.encode(x)], dim=1)
        return codes

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        latent = self.rvq_first.decode(codes[:, :1])
        if codes.shape[1] > 1:
            latent += self.rvq_rest.decode(codes[:, 1:])
        return latent
