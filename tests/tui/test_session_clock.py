"""One clock for the whole conversation: the user's lines and Moshi's come in the order of their
frames, however late the engine answers."""

import numpy as np

from audio import FRAME_SIZE
from audio.core import AudioStats
from engine.interface import Output, Ready
from moshi_tui.messages import TextPiece, UserSpeech
from moshi_tui.session import Session, SessionOptions

LAG = 6  # frames the engine answers behind the source


class LateEngine:
    """Answers every frame, `LAG` frames late, each with a word."""

    max_in_flight = 100
    skipped = 0

    def __init__(self):
        self.sent: list[int] = []
        self.answered = 0
        self.ready = False

    @property
    def in_flight(self):
        return len(self.sent) - self.answered

    def send_frame(self, pcm):
        self.sent.append(len(self.sent))
        return True

    def poll(self, timeout=0.0):
        if not self.ready:
            self.ready = True
            return [Ready({"model": "late"})]
        events = []
        while self.answered < len(self.sent) - LAG or (self.answered < len(self.sent) and len(self.sent) >= 30):
            events.append(Output(self.answered, None, f" w{self.answered}", {}))
            self.answered += 1
        return events

    def reset(self):
        pass

    def close(self):
        pass


class SpeakingFile:
    """30 silent frames as fast as they are taken; the user speaks from frame 10 to 20."""

    realtime = False
    captured_at = None
    records = False

    def __init__(self):
        self.n = 0

    @property
    def finished(self):
        return self.n >= 30

    def read(self, timeout):
        if self.finished:
            return None
        self.n += 1
        return np.zeros(FRAME_SIZE, np.float32)

    def stats(self):
        return AudioStats(voice=10 <= self.n - 1 < 20)

    def play(self, pcm, captured_at=None):
        pass

    def clear(self):
        pass

    def close(self):
        pass


def test_lines_come_in_the_order_of_their_frames(tmp_path):
    events = []
    session = Session(SessionOptions("chat"), LateEngine(), SpeakingFile(), tmp_path)
    session.start(events.append)
    assert session.done.wait(10) and session.failure is None
    lines = [e for e in events if isinstance(e, (TextPiece, UserSpeech))]
    assert [e.t for e in lines] == sorted(e.t for e in lines)
    assert [(round(e.t, 2), e.speaking) for e in lines if isinstance(e, UserSpeech)] == [(0.8, True), (1.6, False)]
    [folder] = session.folders
    lines = (folder / "transcript.txt").read_text().splitlines()
    assert [line.split(" ", 1)[1][:12] for line in lines] == ["moshi: w0 w1", "(you spoke)", "moshi: w10 w"]
