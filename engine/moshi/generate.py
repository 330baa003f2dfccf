"""Streaming generation with the Moshi LM: one 80 ms frame of user codes in, one frame of tokens out.

Each stream has a delay (Moshi: the 7 acoustic codebooks lag one frame behind text and semantic
codes). Tokens live in a small ring ``cache [B, K, max_delay + 2]``; at step t the model reads
slot t, with initial tokens wherever a stream has not started yet, and a step returns the
undelayed frame t - max_delay (so Moshi's first frame comes out of step 1; step 0 gives None).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..compile import AcceleratedStep, step_modes
from ..streaming import StreamingModule, StreamingState
from ..wire import DEFAULT_XA_START
from .model import UNGENERATED_TOKEN, LMModel


@dataclass
class Sampling:
    temp: float = 0.8
    temp_text: float = 0.7
    top_k: int = 250
    top_k_text: int = 25

    @classmethod
    def greedy(cls) -> Sampling:
        return cls(temp=0.0, temp_text=0.0)


@dataclass
class SlotSampling:
    """One slot's own sampling (a server's client chose it), drawn from a generator per stream, so
    that what a seeded conversation draws does not depend on who else shares the batch."""

    sampling: Sampling
    text: torch.Generator
    audio: torch.Generator


def sample_token(logits: torch.Tensor, temp: float, top_k: int,
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """Sample the last dimension: argmax at temp 0, else top-k then an exponential race.

    The race ``argmax(p / Exp(1))`` draws from ``p`` like ``multinomial`` but without a host sync.
    ``generator``: where the race draws from (None: torch's global generator).
    """
    if temp <= 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float() / temp, dim=-1)
    indices = None
    if top_k > 0:
        probs, indices = torch.topk(probs, min(top_k, probs.shape[-1]), dim=-1)
    race = torch.empty_like(probs).exponential_(1, generator=generator)
    choice = (probs / race).argmax(dim=-1, keepdim=True)
    if indices is not None:
        choice = indices.gather(-1, choice)
    return choice[..., 0]


@dataclass
class GenState(StreamingState):
    cache: torch.Tensor  # [B, K, max_delay + 2] tokens, UNGENERATED_TOKEN where nothing is known
    offsets: torch.Tensor  # [B] steps taken by each slot since its last reset
    steps_since_full_reset: int = 0  # host-side, to return None without reading the device

    def reset(self, mask: torch.Tensor | None) -> None:
        if mask is None:
            self.offsets.zero_()
            self.cache.fill_(UNGENERATED_TOKEN)
            self.steps_since_full_reset = 0
        else:
            self.offsets[:] = torch.where(mask, torch.zeros_like(self.offsets), self.offsets)
            self.cache[:] = torch.where(mask[:, None, None], UNGENERATED_TOKEN, self.cache)


@dataclass
class GenOutput:
    tokens: torch.Tensor | None  # [B, 1 + dep_q, 1]: text then generated audio; None before the first frame
    hidden: torch.Tensor  # the temporal transformer's normed output for this step, [B, 1, dim]
    gate: torch.Tensor | None = None  # MoshiVis: [B] mean image gate of this step, on device (0: not looking)


class LMGen(StreamingModule):
    """Wraps an LMModel; ``with gen.streaming(B):`` also puts the model's caches in streaming mode.

    A slot reset in the middle of a batch returns UNGENERATED_TOKEN for that slot until it has a
    full frame again, while the other slots keep going (the reference instead returns None for the
    whole batch for ``max_delay`` steps after any reset).
    """

    def __init__(self, lm: LMModel, sampling: Sampling | None = None, xa_start: int = DEFAULT_XA_START):
        super().__init__()
        self.lm = lm
        self.sampling = sampling or Sampling()
        self.xa_start = xa_start  # with cross-attention: a slot attends the image from its step xa_start on
        # Slots sampled their own way (a server's clients); the others follow `sampling`.
        self.slot_sampling: dict[int, SlotSampling] = {}
        self.register_buffer("delays", torch.tensor(lm.cfg.delays, dtype=torch.long, device=lm.device),
                             persistent=False)
        # On a GPU the two per-step functions run compiled or as CUDA graphs (engine/compile.py).
        # MoshiVis swaps the image tensors between steps, which a captured graph would not see.
        modes = ["eager"] if lm.cfg.cross_attention else step_modes(lm.device)
        self._temporal = AcceleratedStep(lm.forward_text, "temporal step", modes)
        self._depformer = AcceleratedStep(self.depformer_step, "depformer step", modes)

    @property
    def acceleration(self) -> str:
        """How the steps run: "eager" (always on CPU), "compile" or "cuda-graph"."""
        return self._temporal.mode

    @property
    def fallbacks(self) -> list[str]:
        """The step modes given up so far, each with its reason (``AcceleratedStep.fallbacks``)."""
        return self._temporal.fallbacks + self._depformer.fallbacks

    def init_state(self, batch_size: int) -> GenState:
        cfg = self.lm.cfg
        device = self.lm.device
        cache = torch.full((batch_size, cfg.num_streams, cfg.max_delay + 2), UNGENERATED_TOKEN,
                           dtype=torch.long, device=device)
        offsets = torch.zeros(batch_size, dtype=torch.long, device=device)
        # New streaming states: compiled code and graphs holding the old tensors must go.
        self._temporal.reset()
        self._depformer.reset()
        return GenState(batch_size, device, cache=cache, offsets=offsets)

    @torch.no_grad()
    def set_cross_source(self, source: torch.Tensor | None) -> None:
        """MoshiVis: the projected image tokens [B or 1, N, dim] every slot attends to (None: no image)."""
        self.lm.transformer.set_cross_source(source)

    @torch.no_grad()
    def step(self, codes: torch.Tensor) -> torch.Tensor | None:
        """``codes`` [B, ≥ n_q - dep_q, 1]: the user's Mimi codes for this frame (extra codebooks ignored)."""
        return self.step_full(codes).tokens

    @torch.no_grad()
    def step_full(self, codes: torch.Tensor) -> GenOutput:
        state = self.state
        if state is None:
            raise RuntimeError("LMGen.step needs `with gen.streaming(batch_size):`")
        lm, cfg = self.lm, self.lm.cfg
        user_streams = cfg.n_q - cfg.dep_q
        if codes.dim() != 3 or codes.shape[0] != state.batch_size or codes.shape[2] != 1:
            raise ValueError(f"expected codes [{state.batch_size}, {user_streams}, 1], got {tuple(codes.shape)}")
        if codes.shape[1] < user_streams:
            raise ValueError(f"expected {user_streams} user codebooks, got {codes.shape[1]}")
        codes = codes[:, :user_streams]
        slots = state.cache.shape[2]

        user_delays = self.delays[cfg.dep_q + 1:]
        write_at = (state.offsets[:, None, None] + user_delays[:, None]) % slots
        state.cache[:, cfg.dep_q + 1:].scatter_(2, write_at, codes)

        not_started = state.offsets[:, None, None] <= self.delays[:, None]
        read_at = (state.offsets % slots)[:, None, None].expand_as(not_started)
        tokens = torch.where(not_started, lm.initial_tokens(), state.cache.gather(2, read_at))

        cross_active = state.offsets >= self.xa_start if cfg.cross_attention else None
        if cross_active is None:
            hidden, text_logits = self._temporal(tokens)
        else:
            hidden, text_logits = lm.forward_text(tokens, cross_active)
        text = self._sample(text_logits, audio=False)[:, 0, 0]
        # A captured graph would replay the slots' own sampling as it was when captured.
        depformer = self.depformer_step if self.slot_sampling else self._depformer
        audio = depformer(text, hidden) if cfg.dep_q else None

        state.offsets += 1
        state.steps_since_full_reset += 1
        write_at = (state.offsets % slots)[:, None, None]
        state.cache[:, :1].scatter_(2, write_at, text[:, None, None])
        if audio is not None:
            state.cache[:, 1:cfg.dep_q + 1].scatter_(2, write_at.expand(-1, cfg.dep_q, 1), audio[:, :, None])

        gate = lm.transformer.gate_strength
        if state.steps_since_full_reset <= cfg.max_delay:
            return GenOutput(None, hidden, gate)
        generated_delays = self.delays[:cfg.dep_q + 1]
        read_at = (state.offsets[:, None, None] - cfg.max_delay + generated_delays[:, None]) % slots
        out = state.cache.gather(2, read_at)
        incomplete = (state.offsets <= cfg.max_delay)[:, None, None]
        return GenOutput(torch.where(incomplete, UNGENERATED_TOKEN, out), hidden, gate)

    def depformer_step(self, text: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        """Sample the dep_q audio codebooks [B, dep_q] of this frame, each conditioned on the previous one."""
        lm = self.lm
        lm.depformer.reset_streaming()
        token = text
        sampled = []
        for k in range(lm.cfg.dep_q):
            logits = lm.forward_depformer(k, token[:, None], hidden)
            token = self._sample(logits, audio=True)[:, 0]
            sampled.append(token)
        return torch.stack(sampled, dim=1)

    def _sample(self, logits: torch.Tensor, audio: bool) -> torch.Tensor:
        """Every slot as `sampling` says (what a batch without slots of their own always does, so
        its draws stay the same), then each slot with its own settings resampled from its own row."""
        s = self.sampling
        tokens = sample_token(logits, s.temp if audio else s.temp_text, s.top_k if audio else s.top_k_text)
        for row, own in self.slot_sampling.items():
            o = own.sampling
            tokens[row] = sample_token(logits[row:row + 1], o.temp if audio else o.temp_text,
                                       o.top_k if audio else o.top_k_text, own.audio if audio else own.text)[0]
        return tokens
