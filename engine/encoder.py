"""Mimi's streaming encoder behind ``submit`` / ``collect``, so a caller can step the LM meanwhile.

On a CPU with two cores or more, ``EncoderProcess`` runs Mimi in a process of its own: speech
recognition then costs max(encode, LM step) per frame instead of their sum, which is what brings
`moshi transcribe` under real time on a 2-core machine. A conversation also hands it Moshi's
tokens of an earlier frame to decode along with the user's frame to encode (``submit(pcm,
decode=...)``), so that a chat frame costs max(encode + decode, LM step), but two frames later:
a live chat takes it only where its measured stages say it pays (``pipelining_pays``). A process,
not a thread: both stages are many small operations that would take turns on the GIL.
``InlineEncoder`` is the encoding interface in this process (GPUs, single cores,
``MOSHI_NO_PIPELINE=1``).
"""

from __future__ import annotations

import multiprocessing
import os
import signal

import numpy as np
import torch

from audio import FRAME_S, FRAME_SIZE

from .env import env_flag
from .errors import EngineError


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def pipeline_wanted(device: torch.device) -> bool:
    """Mimi in a second process pays off only where it gets a core of its own (and multiprocessing
    gives a daemonic process no children)."""
    return (device.type == "cpu" and usable_cores() >= 2 and not multiprocessing.current_process().daemon
            and not env_flag("MOSHI_NO_PIPELINE"))


def pipeline_forced() -> bool:
    """``MOSHI_PIPELINE=1``: a live chat puts Mimi in its own process whatever its stages measure."""
    return env_flag("MOSHI_PIPELINE")


def pipelining_pays(lm_ms: float, mimi_ms: float, budget_ms: float = FRAME_S * 1000) -> bool:
    """Whether a conversation should run Mimi (encode + decode, ``mimi_ms``) beside the LM step
    rather than after it: only when the two in turn overrun the frame and the slower alone fits.
    Otherwise the frame is either in time already or late anyway, and the two frames of latency
    that pipelining adds buy nothing."""
    return lm_ms + mimi_ms > budget_ms >= max(lm_ms, mimi_ms)


def lm_threads() -> int:
    """The LM's threads beside Mimi's process, which takes a core of its own."""
    return max(1, min(torch.get_num_threads(), usable_cores() - 1))


class InlineEncoder:
    """Mimi in this process: ``submit`` keeps the frames, ``collect`` encodes them."""

    def __init__(self, mimi, device: torch.device, batch_size: int):
        self.mimi = mimi
        self.device = device
        mimi.start_streaming(batch_size)
        self._pcm: np.ndarray | None = None

    def submit(self, pcm: np.ndarray) -> None:
        """One frame per slot, [batch_size, FRAME_SIZE] float32."""
        self._pcm = pcm

    def collect(self) -> torch.Tensor:
        """The codes of the frames submitted last, [batch_size, n_q, 1]."""
        wav = torch.from_numpy(np.ascontiguousarray(self._pcm, dtype=np.float32)).to(self.device)
        self._pcm = None
        with torch.no_grad():
            return self.mimi.encode(wav.reshape(-1, 1, FRAME_SIZE))

    def reset(self, mask: torch.Tensor | None = None) -> None:
        """Start these slots (all if None) over with a fresh stream."""
        self.mimi.reset_streaming(mask)

    def wait_ready(self) -> None:
        pass

    def close(self) -> None:
        self.mimi.stop_streaming()


class EncoderProcess:
    """Mimi in a spawned process, loaded from the same weights file as ``load_mimi`` would read.

    Messages go in order over one pipe, so a reset sent between two frames applies between them.
    Loading starts at construction and overlaps the caller's LM load; ``wait_ready`` raises the
    encoder's load error (a bad checkpoint) in this process, with its own message. Its results are
    the in-process Mimi's, bit for bit: the same weights, kernels and single thread.
    """

    def __init__(self, weights, config, num_codebooks: int, batch_size: int, exact_codes: bool = True):
        context = multiprocessing.get_context("spawn")
        self._conn, child_end = context.Pipe()
        self._process = context.Process(target=_serve, name="moshi-mimi-encoder", daemon=True,
                                        args=(child_end, str(weights), config, num_codebooks, batch_size, exact_codes))
        self._process.start()
        child_end.close()
        self._ready = False
        self._decoded: np.ndarray | None = None

    def wait_ready(self) -> None:
        if not self._ready:
            reply = self._receive()
            if reply != "ready":
                raise EngineError(f"the Mimi encoder process answered {reply!r} instead of starting")
            self._ready = True

    def submit(self, pcm: np.ndarray | None, decode: torch.Tensor | None = None) -> None:
        """Start encoding ``pcm`` (None: no frame) and, with ``decode`` (audio tokens
        [batch_size, n_q, 1]), decoding those tokens; ``collect`` gives the codes (None without a
        frame), then ``decoded`` the audio."""
        self.wait_ready()
        if pcm is not None:
            pcm = np.ascontiguousarray(pcm, dtype=np.float32)
        if decode is None:
            self._send(("encode", pcm))
        else:
            self._send(("codec", (pcm, decode.cpu().numpy())))

    def collect(self) -> torch.Tensor | None:
        reply = self._receive()
        codes, self._decoded = reply if isinstance(reply, tuple) else (reply, None)
        return None if codes is None else torch.from_numpy(codes)

    def decoded(self) -> np.ndarray | None:
        """The audio [batch_size, 1, FRAME_SIZE] of the tokens submitted with the frame ``collect``
        answered last; None if none were."""
        return self._decoded

    def set_num_codebooks(self, n: int) -> None:
        """Encode ``n`` codebooks from the next frame on."""
        self.wait_ready()
        self._send(("codebooks", n))

    def reset(self, mask: torch.Tensor | None = None) -> None:
        self.wait_ready()
        self._send(("reset", None if mask is None else mask.numpy()))

    def close(self) -> None:
        if self._process.is_alive():
            try:
                self._conn.send(("close", None))
            except OSError:
                pass
            self._process.join(timeout=5)
            if self._process.is_alive():
                self._process.kill()
        self._conn.close()

    def _send(self, message) -> None:
        try:
            self._conn.send(message)
        except OSError:
            raise self._gone() from None

    def _receive(self):
        try:
            reply = self._conn.recv()
        except (EOFError, OSError):
            raise self._gone() from None
        if isinstance(reply, BaseException):
            raise reply
        return reply

    def _gone(self) -> EngineError:
        self._process.join(timeout=1)
        return EngineError(f"the Mimi encoder process stopped (exit code {self._process.exitcode}); "
                           "MOSHI_NO_PIPELINE=1 runs Mimi in the main process instead")


def start_encoder_process(info, num_codebooks: int, device: torch.device, exact: bool = False,
                          batch_size: int = 1) -> EncoderProcess:
    """``load_models``'s ``load_codec`` for a pipelined runner: Mimi of checkpoint ``info`` in its process."""
    from .mimi.loading import checkpoint_mimi_config, exact_codes_on

    return EncoderProcess(info.mimi_weights, checkpoint_mimi_config(info), num_codebooks, batch_size,
                          exact_codes_on(device, exact))


def settle_encoder_process(process: EncoderProcess) -> None:
    """Give the process its core (the LM takes the others) and wait for it: a load error is raised here."""
    torch.set_num_threads(lm_threads())
    process.wait_ready()


def _serve(conn, weights: str, config, num_codebooks: int, batch_size: int, exact_codes: bool) -> None:
    # Ctrl-C in the terminal reaches the whole process group; the parent decides when to stop
    # (a live transcription still encodes its trailing silence after it).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    torch.set_num_threads(1)
    from .mimi.loading import load_mimi

    try:
        mimi = load_mimi(weights, config, num_codebooks=num_codebooks, exact_codes=exact_codes)
        mimi.start_streaming(batch_size)
    except Exception as exc:  # the parent raises it: a bad checkpoint must read the same as inline
        conn.send(exc if isinstance(exc, EngineError) else EngineError(f"loading Mimi: {exc}"))
        return
    conn.send("ready")
    with torch.no_grad():
        while True:
            try:
                kind, payload = conn.recv()
            except EOFError:  # the parent is gone
                return
            if kind == "encode":
                conn.send(mimi.encode(torch.from_numpy(payload).reshape(-1, 1, FRAME_SIZE)).numpy())
            elif kind == "codec":  # a conversation's frame: the user's to encode, Moshi's to decode
                pcm, tokens = payload
                codes = None if pcm is None else mimi.encode(torch.from_numpy(pcm).reshape(-1, 1, FRAME_SIZE)).numpy()
                conn.send((codes, mimi.decode(torch.from_numpy(tokens)).float().numpy()))
            elif kind == "codebooks":
                mimi.set_num_codebooks(payload)
            elif kind == "reset":
                mimi.reset_streaming(None if payload is None else torch.from_numpy(payload))
            else:
                return
