"""The declared seams hold: the engine process and the remote engine implement the `Engine`
protocol, and the session needs nothing from its engine beyond that protocol (so another engine,
remote or scripted, can stand in for it by reading `engine/interface.py` alone)."""

import ast
import inspect
from pathlib import Path

import pytest

from engine.interface import Engine
from engine.process import EngineProcess
from engine.remote.chat import RemoteEngine

ROOT = Path(__file__).resolve().parents[1]


def _members(protocol: type) -> set[str]:
    names = set(getattr(protocol, "__annotations__", {}))
    names |= {name for name in vars(protocol) if not name.startswith("_")}
    return names


def _signature(function) -> list[tuple[str, object]]:
    return [(p.name, p.default) for p in inspect.signature(function).parameters.values()]


def _callable_as(implemented, declared) -> bool:
    """The implementation takes the declared parameters, in order, with the same defaults; any
    more it takes are optional."""
    ours, theirs = _signature(implemented), _signature(declared)
    return ours[:len(theirs)] == theirs and all(d is not inspect.Parameter.empty for _, d in ours[len(theirs):])


@pytest.mark.parametrize("implementation", [EngineProcess, RemoteEngine])
def test_the_engines_implement_the_engine_protocol(implementation):
    members = _members(Engine)
    assert {"send_frame", "poll", "reset", "set_image", "close", "in_flight", "max_in_flight", "skipped"} <= members
    for name in members:
        declared = getattr(Engine, name, None)
        if callable(declared):
            assert _callable_as(getattr(implementation, name), declared), name
        elif isinstance(declared, property):
            assert isinstance(getattr(implementation, name), property), name
        else:  # a plain attribute, set in __init__
            assert name in inspect.getsource(implementation.__init__), name


def _engine_uses(path: Path) -> set[str]:
    """Attributes read through `self.engine` or a local `engine` in a module."""
    used = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Attribute):
            target = node.value
            if isinstance(target, ast.Attribute) and target.attr == "engine" or \
                    isinstance(target, ast.Name) and target.id == "engine":
                used.add(node.attr)
    return used


def test_the_session_uses_only_the_engine_protocol():
    used = _engine_uses(ROOT / "moshi_tui" / "session.py")
    assert "send_frame" in used and "poll" in used  # the walk finds the session's calls
    assert used <= _members(Engine), sorted(used - _members(Engine))


def _recorder_uses(path: Path) -> set[str]:
    used = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Attribute) and node.value.attr == "_recorder":
            used.add(node.attr)
    return used


def test_both_recorders_implement_what_the_session_writes():
    """`--no-record` runs the same session with a recorder that keeps nothing: whatever the session
    writes must exist there too, or a no-record session fails on its first such write."""
    from moshi_tui.recording import NoRecorder, Recorder, SessionRecorder

    members = _members(Recorder)
    used = _recorder_uses(ROOT / "moshi_tui" / "session.py")
    assert {"frame", "text", "event"} <= used  # the walk finds the session's writes
    assert used <= members, sorted(used - members)
    for recorder in (SessionRecorder, NoRecorder):
        for name in members:
            assert _callable_as(getattr(recorder, name), getattr(Recorder, name)), (recorder.__name__, name)


def test_every_checkpoint_format_implements_the_format_protocol():
    from engine.formats import FORMATS, Format

    assert FORMATS
    for fmt in FORMATS:
        assert isinstance(fmt.name, str) and fmt.lm_files and all(isinstance(f, str) for f in fmt.lm_files)
        for method in ("matches", "load_lm"):
            assert _callable_as(getattr(fmt, method), getattr(Format, method).__get__(fmt)), (fmt.name, method)
    assert len({fmt.name for fmt in FORMATS}) == len(FORMATS)


def test_the_chat_service_implements_the_service_protocol():
    """What `moshi serve`'s application needs of an endpoint (engine/server/app.py); each service
    the SERVICES table serves is one more row here."""
    from engine.server.app import Service
    from engine.server.chat import ChatService

    members = _members(Service)
    assert {"path", "model", "slots", "metrics", "free_slots", "info", "start", "handle", "stop"} <= members
    for name in members:
        declared = getattr(Service, name, None)
        if callable(declared):
            assert _callable_as(getattr(ChatService, name), declared), name
            assert inspect.iscoroutinefunction(getattr(ChatService, name)) == inspect.iscoroutinefunction(declared)
        else:
            assert hasattr(ChatService, name) or name in inspect.getsource(ChatService.__init__), name
