"""Runner classes the engine process loads by dotted path in tests: the ``Runner`` protocol of
engine/runner.py with numpy only, and knobs to make it fail on purpose."""

from __future__ import annotations

import os
import signal
import sys
import time
from dataclasses import dataclass, field

import numpy as np

from engine.errors import CheckpointError


@dataclass
class ScriptOptions:
    step_s: float = 0.0  # time one step takes
    quick_steps: int = 0  # steps after a reset that take no time (as a runner that pipelines its first ones)
    load_steps: int = 3
    fail_load: str | None = None  # raise CheckpointError(this) while loading
    raise_at: int | None = None  # step raising ZeroDivisionError
    die_at: int | None = None  # step at which the process kills itself
    hang_at: int | None = None  # step that never returns
    freeze_at: int | None = None  # step at which the whole process stops (SIGSTOP)
    extra: dict = field(default_factory=dict)


@dataclass
class Step:  # the fields of engine.runner.StepOutput the engine process sends
    pcm: np.ndarray | None
    text: str | None
    timings_ms: dict
    gate: float | None = None
    user_text: str | None = None
    late: int = 0


class ScriptedRunner:
    """Answers frame n with the input scaled by -0.5 and the text " w<n>" every other frame."""

    frame_size = 1920
    sample_rate = 24000

    def __init__(self, options: ScriptOptions) -> None:
        self.options = options
        self.n = 0

    @classmethod
    def load(cls, options: ScriptOptions, progress=None) -> "ScriptedRunner":
        for i in range(options.load_steps):
            if progress:
                progress(f"part {i + 1} of {options.load_steps}")
        if options.fail_load:
            raise CheckpointError(options.fail_load)
        print("scripted runner loaded")  # must land in the log, not on the terminal
        print("stderr line", file=sys.stderr)
        return cls(options)

    def describe(self) -> dict[str, str]:
        return {"model": "scripted", "device": "cpu", "dtype": "float32"}

    def warmup(self) -> None:
        pass

    def reset(self) -> None:
        self.n = 0

    def close(self) -> None:
        pass

    def step(self, pcm: np.ndarray) -> Step:
        o, n = self.options, self.n
        self.n += 1
        if n == o.die_at:
            os.kill(os.getpid(), signal.SIGKILL)
        if n == o.freeze_at:
            os.kill(os.getpid(), signal.SIGSTOP)
        if n == o.hang_at:
            time.sleep(3600)
        if n == o.raise_at:
            return 1 / 0
        t0 = time.perf_counter()
        time.sleep(0 if n < o.quick_steps else o.step_s)
        text = f" w{n}" if n % 2 else None
        return Step(-0.5 * pcm, text, {"total": (time.perf_counter() - t0) * 1000})


class PictureRunner(ScriptedRunner):
    """ScriptedRunner that looks at a picture: its gate is the picture's mean red level / 2550, so
    a test can tell which picture the engine has."""

    @classmethod
    def load(cls, options: ScriptOptions, progress=None) -> "PictureRunner":
        runner = cls(options)
        runner.gate = 0.0
        return runner

    def set_image(self, picture, name: str) -> None:
        self.gate = float(np.asarray(picture)[..., 0].mean()) / 2550
        self.name = name
        self.reset()

    def describe(self) -> dict[str, str]:
        return {**super().describe(), "image": getattr(self, "name", "")}

    def step(self, pcm: np.ndarray) -> Step:
        out = super().step(pcm)
        return Step(out.pcm, out.text, out.timings_ms, self.gate)
