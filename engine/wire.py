"""Kyutai's websocket protocols, as both their servers and their clients speak them.

``/api/chat`` (Moshi, MoshiVis): binary messages, byte 0 the kind, the rest its payload; audio is
one continuous Ogg/Opus stream per direction at 24 kHz, cut into messages anywhere. The server
greets with a handshake: one byte from Kyutai's Python servers, nine from the Rust ones; a client
takes either and sends audio only after it. A MoshiVis client sends its picture first.

``/api/asr-streaming`` (speech to text, the protocol of Kyutai's Rust ``moshi-server``): msgpack
maps with a ``type``; the client sends ``Audio{pcm}`` (float samples at 24 kHz) or
``OggOpus{data}`` (one Ogg/Opus stream over the connection's messages), ``Marker{id}`` and ``Ping``; the server answers ``Ready``, ``Word{text, start_time}``, ``EndWord{stop_time}``,
``Step{step_idx, prs, buffered_pcm}``, ``Marker{id}`` once the audio before it is transcribed, and
``Error{message}``.

Nothing here imports torch or numpy: the same definitions serve the server, the client and tests.
"""

from __future__ import annotations

from enum import IntEnum, StrEnum

DEFAULT_PORT = 8998
CHAT_PATH = "/api/chat"
ASR_PATH = "/api/asr-streaming"
# How a client shows its key: a header, or a query parameter where a header cannot be set (browsers).
API_KEY_HEADER = "kyutai-api-key"
API_KEY_QUERY = "auth_id"
# MoshiVis: the query parameter that says from which step the model looks at the picture. Kyutai's
# MoshiVis clients always send it, their web client 16 (1.28 s): the default everywhere, servers
# that are not told included.
XA_START_QUERY = "xa_start"
DEFAULT_XA_START = 16
# Sampling in the query string, as Kyutai's web client sends it and its Rust server reads it (its
# Python server reads none): each name with the field of our sampling settings it sets. A
# temperature of 0 is greedy, a top-k of 0 every token.
SAMPLING_QUERY = {"text_temperature": "temp_text", "text_topk": "top_k_text",
                  "audio_temperature": "temp", "audio_topk": "top_k"}
# The seeds of the text's and the audio's draws (Kyutai's Rust server: random when not given).
SEED_QUERY = ("text_seed", "audio_seed")
# Kyutai's web client also sends these, at the values that change nothing unless the user moves them.
NEUTRAL_QUERY = {"pad_mult": 0.0, "repetition_penalty": 1.0}
# Sent when every slot of a server is taken, at once rather than after a silent wait.
NO_FREE_CHANNELS = "no free channels"


class Kind(IntEnum):
    """Byte 0 of an ``/api/chat`` message."""

    HANDSHAKE = 0  # server → client: no payload (Python servers) or two u32 versions (Rust)
    AUDIO = 1  # both ways: Ogg pages of Opus, 24 kHz mono
    TEXT = 2  # server → client: a UTF-8 text piece, "▁" already a space
    CONTROL = 3  # client → server: one byte (start, end turn, pause, restart); unused when streaming
    METADATA = 4  # server → client: UTF-8 JSON about the model and its settings
    ERROR = 5  # server → client: a UTF-8 message for the user
    PING = 6
    COLORED_TEXT = 7  # server → client (MoshiVis): a colour byte 0..10, then a UTF-8 text piece
    IMAGE = 8  # client → server (MoshiVis): an encoded picture, the first message of a session
    CODES = 9
    RATING = 10


HANDSHAKE_PYTHON = bytes([Kind.HANDSHAKE])
HANDSHAKE_RUST = bytes([Kind.HANDSHAKE]) + bytes(8)  # protocol version 0, model version 0, u32 LE each


def message(kind: Kind, payload: bytes = b"") -> bytes:
    return bytes([kind]) + payload


def parse(data: bytes) -> tuple[Kind, bytes] | None:
    """A message's kind and payload; None for an empty message or a kind this protocol does not
    define, which a receiver discards."""
    if not data or data[0] not in Kind._value2member_map_:
        return None
    return Kind(data[0]), data[1:]


class Asr(StrEnum):
    """The ``type`` of an ``/api/asr-streaming`` message."""

    AUDIO = "Audio"  # client → server: {pcm: [float, …]}, 24 kHz mono, any length
    OGG_OPUS = "OggOpus"  # client → server: {data: bytes}, Ogg pages of Opus
    MARKER = "Marker"  # both ways: {id: int}; echoed once the audio sent before it is transcribed
    PING = "Ping"  # client → server: keeps a quiet connection open; nothing answers it
    READY = "Ready"  # server → client: a slot is yours
    WORD = "Word"  # server → client: {text, start_time}
    END_WORD = "EndWord"  # server → client: {stop_time} of the word sent last
    STEP = "Step"  # server → client: {step_idx, prs, buffered_pcm}, every frame
    ERROR = "Error"  # server → client: {message}


def asr_message(kind: Asr, **fields) -> bytes:
    import msgpack  # only the speech-to-text endpoint needs it: not loaded by the app's screen

    # Single floats keep an Audio message at 5 bytes a sample, as Kyutai's scripts send it.
    return msgpack.packb({"type": kind.value, **fields}, use_single_float=True)


def parse_asr(data: bytes) -> tuple[Asr, dict]:
    """A message's type and fields; ValueError for anything else (not msgpack, not a map, an unknown type)."""
    import msgpack

    try:
        fields = msgpack.unpackb(data, raw=False)
    except Exception as exc:  # msgpack raises several unrelated types for malformed input
        raise ValueError(f"not a msgpack message ({exc})") from None
    if not isinstance(fields, dict) or fields.get("type") not in Asr._value2member_map_:
        raise ValueError("not an asr-streaming message: a map with a known type is expected")
    return Asr(fields.pop("type")), fields


# The colour scale of MoshiVis's coloured text: how much the model looked at the picture for a word,
# from its cross-attention gate, on 0..10 (0 at a gate of 0.005 or less, 10 at 0.021 or more).
_GATE_LOW, _GATE_SPAN, COLOURS = 0.005, 0.016, 10


def gate_colour(gate: float) -> int:
    return round(min(max((gate - _GATE_LOW) / _GATE_SPAN, 0.0), 1.0) * COLOURS)


def colour_gate(colour: int) -> float:
    """A gate that ``gate_colour`` maps back to this colour: what a client shows for a coloured word."""
    return _GATE_LOW + _GATE_SPAN * min(max(colour, 0), COLOURS) / COLOURS


def colored_text(colour: int, text: str) -> bytes:
    return message(Kind.COLORED_TEXT, bytes([colour]) + text.encode())


def parse_colored_text(payload: bytes) -> tuple[int, str]:
    if not payload:
        raise ValueError("a coloured text message without its colour byte")
    return payload[0], payload[1:].decode(errors="replace")
