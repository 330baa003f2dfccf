"""A conversation with Mimi in a process of its own gives the answers of one process, two steps later.

Both runners load the same tiny checkpoint and take the same frames (through a reset); the
pipelined one's answers, once its two empty first steps are left out and its ``flush`` appended,
must be the in-process ones: the same tokens and the same samples, bit for bit."""

import numpy as np
import pytest
import torch

from audio import FRAME_SIZE
from engine.encoder import EncoderProcess, start_encoder_process
from engine.mimi.loading import load_checkpoint_mimi
from engine.moshi.runner import ChatRunner
from engine.options import ModelOptions
from engine.runner import FirstFrame, load_models
from engine.tiny import write_tiny_checkpoint


@pytest.fixture(scope="module")
def chat_folder(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("chat") / "tiny", "chat", seed=5)


def _frames(count: int, seed: int) -> list[np.ndarray]:
    """A gliding tone under noise: frames that differ from each other."""
    generator = np.random.default_rng(seed)
    t = np.arange(count * FRAME_SIZE) / 24000
    pcm = 0.3 * np.sin(2 * np.pi * (150 + 300 * t) * t) + 0.05 * generator.standard_normal(t.shape)
    return list(pcm.astype(np.float32).reshape(count, FRAME_SIZE))


def _runner(folder, first_frame: FirstFrame, pipelined: bool) -> ChatRunner:
    options = ModelOptions(hf_repo=str(folder), dtype="float32", temp=0, temp_text=0)
    codec = start_encoder_process if pipelined else load_checkpoint_mimi
    return ChatRunner(load_models(options, "", None, load_codec=codec), first_frame)


def _answers(runner: ChatRunner, conversations: list[list[np.ndarray]]) -> list:
    """(token, pcm) of every step, conversation after conversation; pipelined, the empty first
    two steps of each are left out and its flush is appended."""
    answers = []
    for frames in conversations:
        outs = [runner.step(frame) for frame in frames]
        if runner.pipelined:
            assert all(out.pcm is None and out.token is None for out in outs[:2])
            outs = outs[2:] + runner.flush()
            assert runner.flush() == []
        assert len(outs) == len(frames)
        answers += [(out.token, out.text, out.pcm) for out in outs]
        runner.reset()
    return answers


@pytest.mark.parametrize("first_frame", list(FirstFrame))
def test_pipelined_chat_answers_as_one_process(chat_folder, first_frame):
    conversations = [_frames(14, seed=0), _frames(9, seed=1)]
    inline = _runner(chat_folder, first_frame, pipelined=False)
    pipelined = _runner(chat_folder, first_frame, pipelined=True)
    try:
        assert not inline.pipelined and pipelined.pipelined
        expected, got = _answers(inline, conversations), _answers(pipelined, conversations)
    finally:
        pipelined.close()
    assert [(token, text) for token, text, _ in got] == [(token, text) for token, text, _ in expected]
    tokens = [token for token, _, _ in expected if token is not None]
    assert len(set(tokens)) > 3  # a model that answers something
    voiced = [(a, b) for (_, _, a), (_, _, b) in zip(got, expected) if b is not None]
    assert len(voiced) >= 18 and all(a is not None and np.array_equal(a, b) for a, b in voiced)
    assert np.abs(np.concatenate([b for _, b in voiced])).max() > 0


def test_live_chat_pipelines_mimi_unless_told_not_to(chat_folder, monkeypatch):
    monkeypatch.setattr("engine.encoder.usable_cores", lambda: 2)
    options = ModelOptions(hf_repo=str(chat_folder), dtype="float32")
    runner = ChatRunner.load(options)
    try:
        assert isinstance(runner.encoder, EncoderProcess) and runner.describe()["mimi"] == "own process"
    finally:
        runner.close()
        torch.set_num_threads(1)
    assert not ChatRunner.load(options, None, FirstFrame.RUN_INFERENCE).pipelined  # a file run: frame by frame
    monkeypatch.setenv("MOSHI_NO_PIPELINE", "1")
    assert not ChatRunner.load(options).pipelined
