"""A scripted conversation: deterministic events for snapshot and Pilot tests of the app.

It stands where the live session stands (the app's `Conversation`), so the app code under test is
the real one; only the source of events is fixed. Times are frame indices × 80 ms.
"""

from __future__ import annotations

import math

from audio import FRAME_S
from audio.core import AudioStats
from engine.options import Mode
from moshi_tui.messages import SessionFailed, SessionInfo, StateChanged, Stats, TextPiece, UserSpeech, UserWords

MOSHI_WORDS = (
    "Hello, I'm Moshi. What would you like to talk about today? I can tell you about the weather, "
    "or we could talk about a book you read recently. Sure, the weather here is sunny and warm, "
    "a good day for a walk along the river."
).split(" ")
SEE_WORDS = (
    "I see a bright yellow sun above a blue sky, and green grass below it. It looks like a "
    "child's drawing of a summer day. Would you like to go outside?"
).split(" ")
USER_WORDS = (
    "so this is a test of the transcription in the terminal and it should show every word "
    "that was recognised with the time it was spoken at"
).split(" ")


class ScriptedConversation:
    def __init__(self, mode: Mode = Mode.CHAT) -> None:
        self.mode = Mode(mode)
        self.deliver = None
        self.calls: list[tuple] = []
        self.frame = 0
        self.words = {Mode.CHAT: MOSHI_WORDS, Mode.SEE: SEE_WORDS, Mode.TRANSCRIBE: USER_WORDS}[self.mode]
        self.word = 0
        self.skipped = 0
        self.underruns = 0
        self.folder = None  # where `s` saves the transcript (a test's tmp_path)

    # the app's side
    def start(self, deliver) -> None:
        self.deliver = deliver
        self.calls.append(("start",))

    def set_muted(self, muted: bool) -> None:
        self.calls.append(("muted", muted))

    def restart(self) -> None:
        self.calls.append(("restart",))
        self.frame = self.word = self.skipped = self.underruns = 0

    def set_image(self, data: bytes, name: str) -> None:
        self.calls.append(("image", name, len(data)))
        self.frame = self.word = self.skipped = self.underruns = 0

    def stop(self) -> None:
        self.calls.append(("stop",))

    # the test's side
    def load(self) -> None:
        self.deliver(SessionInfo(self.mode, "kyutai/moshika-pytorch-bf16", "cuda", "bfloat16"))
        self.deliver(StateChanged("loading", "reading model.safetensors"))

    def go_live(self) -> None:
        self.deliver(StateChanged("warming up"))
        self.deliver(StateChanged("live"))

    def play(self, frames: int, *, slow: bool = False, user_speaks_at: int | None = None,
             user_says: tuple[int, str] | None = None) -> None:
        """`frames` frames of conversation: a word every 4 frames, step times under budget
        (over budget with a dropped frame every 5 when `slow`). `user_says` (frame, words): the
        user's words, recognised, one every 3 frames from that frame; Moshi waits for the last."""
        user_words = user_says[1].split(" ") if user_says else []
        for _ in range(frames):
            i = self.frame
            t = i * FRAME_S
            if i == user_speaks_at:
                self.deliver(UserSpeech(t, True))
            heard = (i - user_says[0]) // 3 if user_says and i >= user_says[0] else -1
            if 0 <= heard < len(user_words) and (i - user_says[0]) % 3 == 0:
                self.deliver(UserWords(t, " " + user_words[heard]))
            elif 0 <= heard < len(user_words):
                pass  # Moshi listens
            elif i % 4 == 3 and self.word < len(self.words):
                self.deliver(TextPiece(t, " " + self.words[self.word], self.gate(self.word)))
                self.word += 1
            step = 40.0 + 12.0 * math.sin(i / 3)
            if slow:
                step += 55.0
                if i % 5 == 0:
                    self.skipped += 1
                if i % 7 == 0:
                    self.underruns += 1
            audio = AudioStats(
                input_db=-30.0 + 10 * math.sin(i / 4), output_db=-18.0 + 6 * math.cos(i / 5),
                aec=self.mode.talks, erle_db=21.5 if self.mode.talks else None,
                lag_ms=(900.0 if slow else 310.0) + 2 * (i % 5), buffered_ms=20.0 if slow else 160.0,
                underruns=self.underruns,
            )
            self.deliver(Stats(t, audio, step_ms=step, skipped=self.skipped))
            self.frame += 1

    def gate(self, word: int) -> float | None:
        """`see`: Moshi looks at the picture more and more, then less (levels 0..10 and back)."""
        if self.mode is not Mode.SEE:
            return None
        return 0.005 + 0.0016 * (10 - abs(word % 20 - 10))

    def fail(self, reason: str) -> None:
        self.deliver(SessionFailed(reason))
