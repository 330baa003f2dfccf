"""GPU step acceleration, as far as it runs on CPU: mode selection and escape hatches, the
visible fallback when compile or graph capture fails, and that the per-step functions trace
as one graph each without recompiling as the stream advances (what compile needs on a GPU)."""

import logging

import pytest
import torch
import torch._dynamo.testing
from safetensors.torch import save_file

from engine.compile import AcceleratedStep, step_modes
from engine.moshi.generate import LMGen, Sampling
from engine.moshi.loading import load_lm
from engine.moshi.model import LMConfig
from engine.moshi.tiny import random_lm_state

CUDA = torch.device("cuda")


@pytest.fixture(autouse=True)
def no_hatches(monkeypatch):
    monkeypatch.delenv("MOSHI_NO_COMPILE", raising=False)
    monkeypatch.delenv("MOSHI_NO_CUDA_GRAPH", raising=False)


@pytest.fixture(scope="module")
def gen(tmp_path_factory):
    cfg = LMConfig.tiny_moshi()
    path = tmp_path_factory.mktemp("compile") / "lm.safetensors"
    save_file(random_lm_state(cfg, seed=1), path)
    return LMGen(load_lm(path, cfg, dtype=torch.float32), Sampling.greedy())


def test_modes_and_escape_hatches(monkeypatch):
    assert step_modes(torch.device("cpu")) == ["eager"]
    assert step_modes(CUDA) == ["compile", "cuda-graph", "eager"]
    monkeypatch.setenv("MOSHI_NO_COMPILE", "1")
    assert step_modes(CUDA) == ["cuda-graph", "eager"]
    monkeypatch.setenv("MOSHI_NO_CUDA_GRAPH", "1")
    assert step_modes(CUDA) == ["eager"]
    monkeypatch.setenv("MOSHI_NO_COMPILE", "0")
    assert step_modes(CUDA) == ["compile", "eager"]


def test_cpu_generator_runs_eagerly(gen):
    assert gen.acceleration == "eager"


def _data_dependent(x: torch.Tensor) -> torch.Tensor:
    # A branch on a tensor's value: torch.compile(fullgraph=True) cannot trace it.
    return x * 2 if x.sum().item() > 0 else x - 1


def test_failed_compile_falls_back_visibly(caplog):
    step = AcceleratedStep(_data_dependent, "test step", ["compile", "eager"])
    x = torch.ones(3)
    with caplog.at_level(logging.WARNING, logger="engine.compile"):
        assert torch.equal(step(x), x * 2)
    assert step.mode == "eager"
    assert step.fallbacks and step.fallbacks[0].startswith("compile: ")
    assert "test step: compile failed" in caplog.text and "falling back to eager" in caplog.text
    assert torch.equal(step(-x), -x - 1)


def test_failed_graph_capture_falls_back_after_the_eager_warm_up(caplog):
    """No CUDA here, so the capture fails: the call must still be run, once, by eager mode."""
    calls = []

    def counted(x):
        calls.append(1)
        return x + 1

    step = AcceleratedStep(counted, "test step", ["cuda-graph", "eager"])
    x = torch.zeros(2)
    with caplog.at_level(logging.WARNING, logger="engine.compile"):
        outs = [step(x + i) for i in range(4)]
    assert [o.tolist() for o in outs] == [[1.0, 1.0], [2.0, 2.0], [3.0, 3.0], [4.0, 4.0]]
    assert step.mode == "eager" and "cuda-graph failed" in caplog.text
    assert len(calls) == 4  # the failed capture ran nothing


def test_steps_trace_as_one_graph_each_and_do_not_recompile(gen):
    counter = torch._dynamo.testing.CompileCounter()
    torch._dynamo.reset()
    temporal = torch.compile(gen.lm.forward_text, backend=counter, fullgraph=True)
    depformer = torch.compile(gen.depformer_step, backend=counter, fullgraph=True)
    tokens = torch.randint(0, 100, (6, 1, gen.lm.cfg.num_streams, 1), generator=torch.Generator().manual_seed(0))
    compiled, eager = [], []
    for run, (forward, depth) in ((compiled, (temporal, depformer)), (eager, (gen.lm.forward_text, gen.depformer_step))):
        with gen.streaming(1), torch.no_grad():
            for t in range(6):
                hidden, logits = forward(tokens[t])
                run.append(depth(logits[:, 0, 0].argmax(-1), hidden))
    assert counter.frame_count == 2  # one graph each, the first time only
    for a, b in zip(compiled, eager):
        assert torch.equal(a, b)
