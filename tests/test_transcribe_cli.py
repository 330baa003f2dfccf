"""`moshi transcribe` through the real CLI: output files read back by standard parsers, word times
against the published formula on Kyutai's token stream, interrupted runs, pipes, bad input."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import jsonschema
import numpy as np
import pytest
import sentencepiece
import soundfile
import srt
import webvtt

from safetensors.torch import load_file, save_file

from audio.files import read_audio
from engine.encoder import usable_cores
from transcribe_support import ENV, SCHEMA, moshi, moshi_command, noise, published_words, reference_tokens, stt_folder

pytest.importorskip("moshi.run_inference")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return stt_folder(tmp_path_factory.mktemp("stt") / "tiny")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Two rates, mono 16-bit WAV and stereo FLAC."""
    root = tmp_path_factory.mktemp("inputs")
    a = root / "talk.wav"
    soundfile.write(a, noise(7.3, 16000, seed=1), 16000, subtype="PCM_16")
    b = root / "interview.flac"
    soundfile.write(b, np.stack([noise(5.2, 44100, seed=2), noise(5.2, 44100, seed=3)], axis=1), 44100)
    return a, b


@pytest.fixture(scope="module")
def all_formats(folder, files, tmp_path_factory):
    out = tmp_path_factory.mktemp("out")
    result = moshi("transcribe", "--model", folder, *files, "-f", "all", "-o", out, "--max-line-width", 24,
                   "--stats", "--exact")  # its words are compared with Kyutai's
    assert result.returncode == 0, result.stderr
    return out, result


def _schema():
    return json.loads(SCHEMA.read_text())


def _seconds(delta):
    return delta.total_seconds()


def test_json_is_valid_and_word_times_follow_the_published_formula(folder, files, all_formats):
    out, _ = all_formats
    tokenizer = sentencepiece.SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))
    for path in files:
        doc = json.loads((out / f"{path.stem}.json").read_text())
        jsonschema.validate(doc, _schema())
        assert doc["complete"] is True and doc["source"] == str(path)
        assert doc["duration"] == pytest.approx(soundfile.info(path).duration, abs=1e-3)
        assert doc["model"]["delay_seconds"] == 0.5 and doc["model"]["vad_heads"] is True
        # Kyutai's engine on the same audio at 24 kHz gives the tokens; the formula gives the words.
        expected = published_words(reference_tokens(folder, read_audio(path)), tokenizer, 0.5)
        assert len(expected) >= 10
        assert [(w["text"], w["start"], w["end"]) for w in doc["words"]] == [
            (text, round(start, 3), round(end, 3)) for text, start, end in expected]
        # Segments partition the words, in order.
        assert [w["segment"] for w in doc["words"]] == sorted(w["segment"] for w in doc["words"])
        for segment in doc["segments"]:
            words = [w for w in doc["words"] if w["segment"] == segment["id"]]
            assert segment["text"] == " ".join(w["text"] for w in words)
            assert (segment["start"], segment["end"]) == (words[0]["start"], words[-1]["end"])
        assert doc["segments"][-1]["end_reason"] == "end"


def test_srt_and_vtt_read_back_with_the_same_words_and_times(files, all_formats):
    out, _ = all_formats
    for path in files:
        words = json.loads((out / f"{path.stem}.json").read_text())["words"]
        cues = [(c.content, _seconds(c.start), _seconds(c.end))
                for c in srt.parse((out / f"{path.stem}.srt").read_text())]
        captions = [(c.text, c.start_time.in_milliseconds() / 1000, c.end_time.in_milliseconds() / 1000)
                    for c in webvtt.read(out / f"{path.stem}.vtt")]
        for parsed in (cues, captions):
            assert " ".join(text for text, _, _ in parsed).split() == [w["text"] for w in words]
            i = 0
            for text, start, end in parsed:
                n = len(text.split())
                assert "\n" not in text
                assert len(text) <= 24 or n == 1, "--max-line-width"
                assert (start, end) == (words[i]["start"], words[i + n - 1]["end"])
                assert len({w["segment"] for w in words[i:i + n]}) == 1, "a cue never spans two segments"
                i += n


def test_txt_and_jsonl_hold_the_same_transcript(files, all_formats):
    out, _ = all_formats
    for path in files:
        doc = json.loads((out / f"{path.stem}.json").read_text())
        assert (out / f"{path.stem}.txt").read_text() == "".join(s["text"] + "\n" for s in doc["segments"])
        lines = [json.loads(line) for line in (out / f"{path.stem}.jsonl").read_text().splitlines()]
        assert lines[0]["type"] == "start" and lines[0]["model"] == doc["model"]
        assert lines[-1] == {"type": "end", "complete": True, "duration": doc["duration"]}
        assert [{k: v for k, v in line.items() if k != "type"} for line in lines if line["type"] == "word"] == \
            doc["words"]
        assert [{k: v for k, v in line.items() if k != "type"} for line in lines if line["type"] == "segment"] == \
            doc["segments"]


def test_stats_report_real_time_factor_delay_and_frames(all_formats, files):
    _, result = all_formats
    line = result.stderr.strip().splitlines()[-1]
    assert "real-time factor" in line and "model delay 0.5 s" in line
    frames = int(line.split(" frames in ")[0].rsplit(" ", 1)[1])
    # Each input: its 24 kHz samples plus 1.5 s of trailing silence, in whole 1920-sample frames.
    assert frames == sum((round(soundfile.info(p).duration * 24000) + 36000) // 1920 for p in files)
    assert "steps of batch 2" in line


def test_max_words_per_line(folder, files, tmp_path):
    result = moshi("transcribe", "--model", folder, files[0], "-f", "srt", "--max-words-per-line", 2)
    assert result.returncode == 0, result.stderr
    cues = list(srt.parse(result.stdout))
    assert len(cues) > 3 and all(len(c.content.split()) <= 2 for c in cues)
    assert any(len(c.content.split()) == 2 for c in cues)


def _start_long_run(folder, tmp_path, seconds=90):
    path = tmp_path / "long.wav"
    soundfile.write(path, noise(seconds, 24000, seed=5), 24000)
    out = tmp_path / "out"
    process = subprocess.Popen(moshi_command("transcribe", "--model", folder, path, "-f", "all", "-o", out),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=ENV)
    jsonl = out / "long.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if jsonl.exists() and jsonl.read_text().count('"type": "segment"') >= 2:
            return process, out
        assert process.poll() is None, process.communicate()
        time.sleep(0.05)
    process.kill()
    pytest.fail("no segment came out in time")


def _check_partial_files(out, killed):
    doc = json.loads((out / "long.json").read_text())
    jsonschema.validate(doc, _schema())
    assert doc["complete"] is False and len(doc["words"]) > 0
    lines = [json.loads(line) for line in (out / "long.jsonl").read_text().splitlines()]
    words = [line["text"] for line in lines if line["type"] == "word"]
    assert (lines[-1]["type"] == "end") is not killed
    assert [w["text"] for w in doc["words"]] == words[:len(doc["words"])]
    cues = list(srt.parse((out / "long.srt").read_text()))
    captions = webvtt.read(out / "long.vtt")
    assert len(cues) == len(captions) > 0
    assert " ".join(c.content for c in cues).split() == words[:len(" ".join(c.content for c in cues).split())]
    assert (out / "long.txt").read_text().split() == words[:len((out / "long.txt").read_text().split())]
    return doc, words


def test_interrupted_run_keeps_valid_partial_files(folder, tmp_path):
    process, out = _start_long_run(folder, tmp_path)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 130, stderr
    assert "interrupted" in stderr.decode()
    doc, words = _check_partial_files(out, killed=False)
    assert len(doc["words"]) == len(words), "on Ctrl-C every word so far is written everywhere"
    assert doc["duration"] < 90


def _children(pid):
    path = f"/proc/{pid}/task/{pid}/children"
    with open(path) as f:
        return [int(child) for child in f.read().split()]


def _alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[-1][0] != "Z"
    except FileNotFoundError:
        return False


def test_killed_run_leaves_parseable_files_and_no_process_behind(folder, tmp_path):
    process, out = _start_long_run(folder, tmp_path)
    children = _children(process.pid)
    process.kill()
    process.communicate(timeout=60)
    _check_partial_files(out, killed=True)
    deadline = time.monotonic() + 10
    while any(_alive(child) for child in children) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(_alive(child) for child in children), "the Mimi encoder process outlived the CLI"


@pytest.mark.skipif(usable_cores() < 2, reason="Mimi gets a process of its own only with 2 cores or more")
def test_encoder_process_that_dies_is_a_clear_error_and_keeps_the_words(folder, tmp_path):
    process, out = _start_long_run(folder, tmp_path)
    encoders = [pid for pid in _children(process.pid)
                if b"spawn_main" in open(f"/proc/{pid}/cmdline", "rb").read()]
    assert len(encoders) == 1
    os.kill(encoders[0], signal.SIGKILL)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 1
    last = stderr.decode().strip().splitlines()[-1]
    assert last.startswith("moshi: error: the Mimi encoder process stopped (exit code -9)"), stderr
    assert "MOSHI_NO_PIPELINE=1" in last
    _check_partial_files(out, killed=False)


def test_mimi_checkpoint_with_a_missing_key_is_named(tmp_path, files):
    broken = stt_folder(tmp_path / "broken")
    state = load_file(broken / "mimi.safetensors")
    del state["decoder.model.0.conv.conv.bias"]
    save_file(state, broken / "mimi.safetensors")
    result = moshi("transcribe", "--model", broken, files[0])
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("moshi: error:") and "decoder.model.0.conv.conv.bias" in lines[-1], result.stderr
    assert "Traceback" not in result.stderr


# -- standard input, through real pipes ------------------------------------------------------------


def _words_from_file(folder, path):
    result = moshi("transcribe", "--model", folder, path)
    assert result.returncode == 0, result.stderr
    assert len(result.stdout.strip()) > 20
    return result.stdout


def _words_from_pipe(folder, producer, *args):
    """`producer | moshi transcribe - ARGS`: the producer's stdout is the CLI's stdin, a real pipe."""
    feeder = subprocess.Popen(producer, stdout=subprocess.PIPE)
    try:
        result = moshi("transcribe", "--model", folder, "-", *args, stdin=feeder.stdout)
    finally:
        feeder.stdout.close()
        feeder.wait(timeout=60)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_stdin_formats_through_a_pipe_equal_the_file(folder, files):
    wav, flac = files
    assert _words_from_pipe(folder, ["cat", str(wav)]) == _words_from_file(folder, wav)
    assert _words_from_pipe(folder, ["cat", str(flac)]) == _words_from_file(folder, flac)


def test_stdin_redirected_from_a_file(folder, files):
    _, flac = files
    with open(flac, "rb") as f:
        result = moshi("transcribe", "--model", folder, "-", stdin=f)
    assert result.returncode == 0, result.stderr
    assert result.stdout == _words_from_file(folder, flac)


@pytest.mark.skipif(shutil.which("sox") is None, reason="sox is installed by .ci/run")
@pytest.mark.parametrize("sox_args", [["-b", "24"], ["-e", "float", "-b", "32", "-c", "2"]])
def test_wav_stream_of_unknown_length_from_sox(folder, files, tmp_path, sox_args):
    """sox reading a pipe cannot know the length: its WAV header says so, and decoding goes as data comes."""
    wav, _ = files
    samples, _ = soundfile.read(wav, dtype="int16")
    raw = tmp_path / "talk.raw"
    raw.write_bytes(samples.tobytes())
    script = f"cat {raw} | sox -t raw -r 16000 -e signed -b 16 -c 1 - {' '.join(sox_args)} -t wav -"
    assert _words_from_pipe(folder, ["bash", "-c", script]) == _words_from_file(folder, wav)


def test_raw_pcm_trickling_through_a_pipe(folder, files, tmp_path):
    wav, _ = files
    samples, rate = soundfile.read(wav, dtype="int16")
    raw = tmp_path / "talk.raw"
    raw.write_bytes(samples.astype("<i2").tobytes())
    # Odd-sized writes with pauses: reads see half samples and partial blocks, as from a live recorder.
    trickle = (f"import sys, time\ndata = open({str(raw)!r}, 'rb').read()\n"
               "for i in range(0, len(data), 3001):\n"
               "    sys.stdout.buffer.write(data[i:i + 3001]); sys.stdout.flush(); time.sleep(0.002)\n")
    piped = _words_from_pipe(folder, [sys.executable, "-c", trickle], "--raw", "--rate", rate)
    assert piped == _words_from_file(folder, wav)


# -- bad input: one clear line, nothing lost ------------------------------------------------------


@pytest.mark.parametrize("args, message", [
    (["-", "--raw"], "--raw needs --rate"),
    (["{wav}", "--raw", "--rate", "16000"], "give - as the only FILE"),
    (["-", "-"], "standard input (-) can be read only once"),
    (["{wav}", "{flac}", "-f", "srt"], "add --output-dir"),
    (["{wav}", "-f", "all"], "add --output-dir"),
])
def test_usage_errors(folder, files, args, message):
    wav, flac = files
    result = moshi("transcribe", "--model", folder, *[a.format(wav=wav, flac=flac) for a in args])
    assert result.returncode == 2
    assert message in " ".join(result.stderr.split())


def test_bad_file_among_several_fails_before_anything_is_written(folder, files, tmp_path):
    broken = tmp_path / "broken.mp3"
    broken.write_bytes(b"not audio")
    out = tmp_path / "out"
    result = moshi("transcribe", "--model", folder, files[0], broken, "-o", out)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("moshi: error:") and "broken.mp3" in lines[0]
    assert not out.exists()


def test_same_name_twice_is_refused(folder, files, tmp_path):
    other = tmp_path / "talk.wav"
    shutil.copy(files[0], other)
    result = moshi("transcribe", "--model", folder, files[0], other, "-o", tmp_path / "out")
    assert result.returncode == 1 and "two inputs are named 'talk'" in result.stderr


@pytest.mark.parametrize("pipe", [True, False])
def test_empty_stdin_is_one_line_error(folder, pipe):
    feeder = subprocess.Popen(["true"], stdout=subprocess.PIPE) if pipe else None
    result = moshi("transcribe", "--model", folder, "-", stdin=feeder.stdout if pipe else subprocess.DEVNULL)
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    assert last == "moshi: error: standard input is empty: no audio came in"
