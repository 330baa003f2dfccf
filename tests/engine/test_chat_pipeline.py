"""A conversation with Mimi in a process of its own gives the answers of one process, two steps later.

Both runners load the same tiny checkpoint and take the same frames (through a reset); the
pipelined one's answers, once its two empty first steps are left out and its ``flush`` appended,
must be the in-process ones: the same tokens and the same samples, bit for bit."""

import numpy as np
import pytest
import soundfile
import torch

from audio import FRAME_SIZE
from engine.encoder import pipelining_pays, start_encoder_process, usable_cores
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


def test_pipelining_pays_only_where_the_sum_overruns_and_the_slower_stage_fits():
    assert pipelining_pays(60, 30) and pipelining_pays(30, 60) and pipelining_pays(80, 1)
    assert not pipelining_pays(50, 30)  # in time in one process: the two frames of latency buy nothing
    assert not pipelining_pays(300, 40) and not pipelining_pays(20, 90)  # late either way


def test_live_chat_places_mimi_by_its_measured_stages(chat_folder, monkeypatch):
    """The warm-up times the LM and Mimi and pipelines where ``pipelining_pays`` says so; the
    pipelined runner then answers as the one-process one (two steps later)."""
    import engine.moshi.runner as chat_runner

    monkeypatch.setattr("engine.encoder.usable_cores", lambda: 2)
    measured = []
    for verdict in (False, True):
        monkeypatch.setattr(chat_runner, "pipelining_pays",
                            lambda lm_ms, mimi_ms: measured.append((lm_ms, mimi_ms)) or verdict)
        runner = ChatRunner.load(ModelOptions(hf_repo=str(chat_folder), dtype="float32", temp=0, temp_text=0))
        try:
            assert not runner.pipelined
            runner.warmup()
            assert runner.pipelined == verdict
            info = runner.describe()
            assert info["mimi"] == ("own process" if verdict else "in the engine") and "Mimi" in info["mimi stages"]
            if verdict:
                got = _answers(runner, [_frames(6, seed=2)])
        finally:
            runner.close()
            torch.set_num_threads(1)
    assert len(measured) == 2 and all(lm > 0 and mimi > 0 for lm, mimi in measured)
    inline = _runner(chat_folder, FirstFrame.SERVER, pipelined=False)
    expected = _answers(inline, [_frames(6, seed=2)])
    assert [(token, text) for token, text, _ in got] == [(token, text) for token, text, _ in expected]


def test_where_mimi_runs_is_not_measured_off_a_live_cpu_chat(chat_folder, monkeypatch):
    monkeypatch.setattr("engine.encoder.usable_cores", lambda: 2)
    options = ModelOptions(hf_repo=str(chat_folder), dtype="float32")
    assert ChatRunner.load(options).start_mimi_process is not None
    assert ChatRunner.load(options, None, FirstFrame.RUN_INFERENCE).start_mimi_process is None  # a file run
    monkeypatch.setenv("MOSHI_NO_PIPELINE", "1")
    assert ChatRunner.load(options).start_mimi_process is None


@pytest.mark.skipif(usable_cores() < 2, reason="Mimi's process needs a core of its own")
@pytest.mark.timeout(240)
def test_pipelined_words_are_stamped_with_the_frames_they_are_of(tmp_path, monkeypatch):
    """A live chat through the engine process and the session, with the user's words beside it:
    forced into a pipeline (MOSHI_PIPELINE=1) and in one process, the words of both sides get the
    same times, though the pipeline answers two frames later."""
    from engine.process import EngineProcess
    from moshi_tui.messages import TextPiece, UserWords
    from moshi_tui.session import FileSource, Session, SessionOptions

    folder = write_tiny_checkpoint(tmp_path / "chat", "chat", seed=0)
    stt = write_tiny_checkpoint(tmp_path / "stt", "transcribe", seed=0)
    audio = tmp_path / "me.wav"
    soundfile.write(audio, np.concatenate(_frames(40, seed=3)), 24000)
    model = ModelOptions(hf_repo=str(folder), dtype="float32", temp=0, temp_text=0, user_stt=str(stt))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    words = {}
    for mode, variable in (("pipelined", "MOSHI_PIPELINE"), ("one process", "MOSHI_NO_PIPELINE")):
        monkeypatch.delenv("MOSHI_PIPELINE", raising=False)
        monkeypatch.setenv(variable, "1")
        engine = EngineProcess("chat", model)
        session = Session(SessionOptions("chat", model), engine, FileSource(audio, realtime=False), tmp_path / mode)
        events = []
        session.start(events.append)
        assert session.done.wait(200) and session.failure is None
        assert engine.info["mimi"] == ("own process" if mode == "pipelined" else "in the engine")
        words[mode] = [(type(e).__name__, round(e.t, 2), e.text) for e in events if isinstance(e, (TextPiece, UserWords))]
    # The pipeline's last two frames are never answered live.
    last = (40 - 3) * 0.08 + 1e-6
    expected = [w for w in words["one process"] if w[1] <= last]
    assert {kind for kind, _, _ in expected} == {"TextPiece", "UserWords"}
    assert [w for w in words["pipelined"] if w[1] <= last] == expected


@pytest.mark.parametrize("exact", [False, True])
def test_exact_flag_chooses_mimis_encoding_kernels(chat_folder, exact):
    """``--exact`` (``ModelOptions.exact``) reaches Mimi; without it a CPU encodes with the fast kernels
    and decodes from bfloat16 weights (where the CPU gains by it)."""
    runner = ChatRunner.load(ModelOptions(hf_repo=str(chat_folder), dtype="float32", exact=exact), None,
                             FirstFrame.RUN_INFERENCE)
    mimi = runner.models.mimi
    convs = [mimi.downsample.conv, *(m for m in mimi.encoder.modules() if hasattr(m, "exact"))]
    assert len(convs) > 10 and all(conv.exact == exact for conv in convs)
    decoding = [m for m in mimi.decoder.modules() if hasattr(m, "exact")] + [mimi.decoder_transformer]
    assert all(m.half != exact for m in decoding)
    assert all(not m.exact for m in decoding[:-1])  # decoding never takes the reference's kernels
