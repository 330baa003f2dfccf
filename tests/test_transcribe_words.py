"""Batched streaming transcription and word timestamps, in process, on tiny random STT checkpoints.

Tokens are compared with Kyutai's `moshi-inference` on the same folder and audio; word times with
an independent implementation of the published formula (DSM `tokens_to_timestamped_text`).
"""

import multiprocessing

import numpy as np
import pytest
import sentencepiece
from safetensors.torch import load_file, save_file

from engine.encoder import usable_cores
from engine.errors import CheckpointError
from engine.options import ModelOptions
from engine.stt.runner import TranscribeRunner
from engine.stt.transcription import BatchTranscriber, LiveTranscriber
from engine.stt.words import Segment, TranscriptListener, Word, WordAssembler
from transcribe_support import noise, published_words, reference_tokens, stt_folder

pytest.importorskip("moshi.run_inference")

# stt-1b-en_fr's padding, and stt-2.6b-en's (1 s of silence first, 2.5 s delay).
CONFIGS = {"1b": None, "2.6b": {"audio_delay_seconds": 2.5, "audio_silence_prefix_seconds": 1.0}}


class Recorder(TranscriptListener):
    def __init__(self):
        self.tokens, self.vad, self.words, self.segments, self.ended = [], [], [], [], None

    def on_token(self, token, piece, time):
        self.tokens.append(token)

    def on_vad(self, time, pause):
        self.vad.append(pause)

    def on_word(self, word):
        self.words.append(word)

    def on_segment(self, segment):
        self.segments.append(segment)

    def on_end(self, complete, duration):
        self.ended = (complete, duration)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("stt")
    return {name: stt_folder(root / name, stt_config=config) for name, config in CONFIGS.items()}


@pytest.fixture(scope="module")
def inputs():
    # Lengths that are not whole frames, and differ, so slots finish at different steps.
    return [noise(seconds, seed=i) for i, seconds in enumerate((4.03, 2.5, 6.17))]


def _blocks(pcm, size):
    return [pcm[i:i + size] for i in range(0, len(pcm), size)]


def _transcribe(folder, pcms, batch_size, block=4999):
    runner = TranscribeRunner.load(ModelOptions(hf_repo=str(folder), exact=True), batch_size=batch_size)
    try:
        recorders = [Recorder() for _ in pcms]
        stats = BatchTranscriber(runner).run((_blocks(pcm, block), rec) for pcm, rec in zip(pcms, recorders))
        return recorders, stats, runner
    finally:
        runner.close()


@pytest.mark.parametrize("config", CONFIGS)
def test_tokens_match_reference_and_words_match_published_formula(folders, inputs, config):
    folder = folders[config]
    recorders, stats, runner = _transcribe(folder, inputs, batch_size=3)
    tokenizer = sentencepiece.SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))
    offset = runner.silence_prefix_seconds + runner.delay_seconds
    assert offset == {"1b": 0.5, "2.6b": 3.5}[config]
    for pcm, rec in zip(inputs, recorders):
        expected = reference_tokens(folder, pcm)
        assert rec.tokens == expected
        published = published_words(expected, tokenizer, offset)
        assert len(published) >= 5, "too few words for the comparison to mean much"
        assert [(w.text, w.start, w.end) for w in rec.words] == published
        assert rec.ended == (True, len(pcm) / 24000)
        assert len(rec.vad) == len(expected) and all(len(p) == 4 for p in rec.vad)
    assert stats.audio_seconds == pytest.approx(sum(len(p) for p in inputs) / 24000)


def test_batch_of_three_equals_one_by_one(folders, inputs):
    together, stats3, _ = _transcribe(folders["1b"], inputs, batch_size=3)
    alone = [_transcribe(folders["1b"], [pcm], batch_size=1)[0][0] for pcm in inputs]
    # Two slots for three inputs: the first slot to finish is reset and takes the third.
    refilled, stats2, _ = _transcribe(folders["1b"], inputs, batch_size=2, block=24000)
    for a, b, c in zip(together, alone, refilled):
        assert a.tokens == b.tokens == c.tokens
        assert a.words == b.words == c.words
        np.testing.assert_allclose(a.vad, b.vad, atol=1e-2)  # bf16 heads, batched matmuls
    assert stats3.steps < stats2.steps < sum(len(r.tokens) + 1 for r in alone)


@pytest.mark.skipif(usable_cores() < 2, reason="Mimi gets a process of its own only with 2 cores or more")
def test_mimi_in_this_process_gives_the_same_transcript(folders, inputs, monkeypatch):
    """The batch path with Mimi in a second process (the default on 2 cores), and without it."""
    pipelined, _, runner = _transcribe(folders["1b"], inputs, batch_size=2)
    assert runner.pipelined
    monkeypatch.setenv("MOSHI_NO_PIPELINE", "1")
    inline, _, runner = _transcribe(folders["1b"], inputs, batch_size=2)
    assert not runner.pipelined
    for a, b in zip(pipelined, inline):
        assert a.tokens == b.tokens and a.words == b.words and a.ended == b.ended


def test_a_bad_lm_checkpoint_leaves_no_encoder_process(tmp_path):
    """Mimi's process starts loading before the LM; an LM that fails to load ends it."""
    folder = stt_folder(tmp_path / "broken")
    state = load_file(folder / "model.safetensors")
    state["text_linear.weight_renamed"] = state.pop("text_linear.weight")
    save_file(state, folder / "model.safetensors")
    before = set(multiprocessing.active_children())
    with pytest.raises(CheckpointError, match="text_linear.weight"):
        TranscribeRunner.load(ModelOptions(hf_repo=str(folder)))
    assert set(multiprocessing.active_children()) <= before


@pytest.mark.parametrize("pipeline", ["mimi in its own process", "mimi in this process"])
def test_live_transcriber_matches_batch(folders, inputs, pipeline, monkeypatch):
    """In this process the live path double-feeds the first frame instead of delaying every
    frame; with Mimi in its own process each step answers for the frame before. Same tokens."""
    (batch,), _, _ = _transcribe(folders["2.6b"], inputs[:1], batch_size=1)
    if pipeline == "mimi in this process":
        monkeypatch.setenv("MOSHI_NO_PIPELINE", "1")
    runner = TranscribeRunner.load(ModelOptions(hf_repo=str(folders["2.6b"])))
    assert runner.pipelined == (pipeline == "mimi in its own process" and usable_cores() >= 2)
    live = Recorder()
    transcriber = LiveTranscriber(runner, live)
    try:
        for block in _blocks(inputs[0], 700):  # smaller than a frame, as a sound card delivers
            transcriber.push(block)
        transcriber.finish()
    finally:
        runner.close()
    assert live.tokens == batch.tokens and live.words == batch.words and live.segments == batch.segments
    assert live.ended == batch.ended


# -- the word and segment rules on hand-made token streams ---------------------------------------


@pytest.fixture(scope="module")
def tokenizer(folders):
    return sentencepiece.SentencePieceProcessor(model_file=str(folders["1b"] / "tokenizer.model"))


def _ids(tokenizer, *pieces):
    ids = [tokenizer.piece_to_id(p) for p in pieces]
    assert tokenizer.unk_id() not in ids
    return ids


def _run(tokenizer, stream, offset=0.5, pause_seconds=1.0, vad=None):
    rec = Recorder()
    words = WordAssembler(tokenizer, offset, rec, pause_seconds)
    for i, token in enumerate(stream):
        words.push(token, None if vad is None else vad[i])
    words.finish(True, 12.0)
    return rec


def _t(position, offset=0.5):
    return position / 12.5 - offset


def test_word_spans_boundary_to_boundary(tokenizer):
    the, sky = _ids(tokenizer, "▁th", "▁s")
    e, y = _ids(tokenizer, "e", "y")
    # EPAD at 10 and 16 and 30: "the" from 11 to 16, "sky" from 17 to 30; tokens before the first EPAD are no word.
    stream = [e] + [3] * 9 + [0, the, e, 3, 3, 3, 0, sky, y] + [3] * 11 + [0] + [3] * 20
    rec = _run(tokenizer, stream)
    assert [(w.text, w.start, w.end) for w in rec.words] == [("the", _t(11), _t(16)), ("sy", _t(17), _t(30))]
    assert [s.end_reason for s in rec.segments] == ["end"]


def test_last_word_ends_at_eos_or_one_second_or_stream_end(tokenizer):
    (the,) = _ids(tokenizer, "▁th")
    tail = [3] * 40
    assert [(w.start, w.end) for w in _run(tokenizer, [3] * 10 + [0, the] + tail).words] == [(_t(11), _t(11 + 12.5))]
    eos = tokenizer.eos_id()
    assert [(w.start, w.end) for w in _run(tokenizer, [3] * 10 + [0, the, 3, eos] + tail).words] == [(_t(11), _t(13))]
    short = [3] * 10 + [0, the, 3, 3]
    assert [(w.start, w.end) for w in _run(tokenizer, short).words] == [(_t(11), _t(len(short)))]


def test_several_words_without_boundary_share_the_span_by_token_count(tokenizer):
    the, e, sky = _ids(tokenizer, "▁th", "e", "▁s")
    rec = _run(tokenizer, [3] * 10 + [0, the, e, sky, 3, 3, 3, 0] + [3] * 5)
    n_the = len(tokenizer.encode("the"))
    assert [(w.text, w.start, w.end) for w in rec.words] == [("the", _t(11), _t(11 + n_the)),
                                                            ("s", _t(11 + n_the), _t(17))]


def test_segments_break_at_pauses(tokenizer):
    a, b = _ids(tokenizer, "▁th", "▁s")
    # Last text token of the first word at 11, next word's first token at 11 + 1 + 13: 13 silent frames (1.04 s).
    stream = [3] * 10 + [0, a] + [3] * 12 + [0, b, 3, 0, a] + [3] * 20
    assert [len(s.words) for s in _run(tokenizer, stream, pause_seconds=1.0).segments] == [1, 2]
    assert [s.end_reason for s in _run(tokenizer, stream, pause_seconds=1.0).segments] == ["pause", "end"]
    assert [len(s.words) for s in _run(tokenizer, stream, pause_seconds=1.1).segments] == [3]


def test_segments_break_at_predicted_end_of_turn(tokenizer):
    a, b = _ids(tokenizer, "▁th", "▁s")
    stream = [3] * 10 + [0, a, 3, 3, 3, 0, b] + [3] * 20
    quiet = [[0.1, 0.2, 0.3, 0.4]] * len(stream)
    rec = _run(tokenizer, stream, vad=quiet)
    assert len(rec.segments) == 1 and rec.segments[0].end_of_turn == pytest.approx(0.3)
    turn = [list(p) for p in quiet]
    turn[13] = [0.9, 0.9, 0.8, 0.9]  # between the two words, head 2 (2 s horizon) over 0.5
    rec = _run(tokenizer, stream, vad=turn)
    assert [(s.text, s.end_reason) for s in rec.segments] == [("th", "end_of_turn"), ("s", "end")]
    assert rec.segments[0].end_of_turn == pytest.approx(0.8)
    head0_only = [list(p) for p in quiet]
    head0_only[13] = [0.9, 0.4, 0.3, 0.9]
    assert len(_run(tokenizer, stream, vad=head0_only).segments) == 1


def test_segment_text_and_times():
    words = [Word("Hello", 0.5, 0.9), Word("world.", 0.9, 1.6)]
    segment = Segment(words, "end")
    assert (segment.text, segment.start, segment.end) == ("Hello world.", 0.5, 1.6)


def test_live_source_is_transcribed_until_it_ends(folders, tmp_path):
    """`--no-tui` from a session source (here a file, read as the microphone would be)."""
    import soundfile

    from moshi_tui.commands.transcribe import transcribe_source
    from moshi_tui.session import FileSource

    pcm = noise(3.1, seed=7)
    path = tmp_path / "mic.wav"
    soundfile.write(path, pcm, 24000, subtype="FLOAT")
    (batch,), _, _ = _transcribe(folders["1b"], [pcm], batch_size=1)
    runner = TranscribeRunner.load(ModelOptions(hf_repo=str(folders["1b"])))
    live = Recorder()
    transcribe_source(FileSource(path, realtime=False), LiveTranscriber(runner, live))
    # The source adds seconds of silence of its own: the batch run's tokens come first, then more padding.
    assert live.tokens[:len(batch.tokens)] == batch.tokens and len(live.tokens) > len(batch.tokens)
    assert live.ended[0] is True and live.ended[1] > 3.1
