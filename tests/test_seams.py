"""The declared seams hold: the engine process implements the `Engine` protocol, and the session
needs nothing from its engine beyond that protocol (so another engine, remote or scripted, can
stand in for it by reading `engine/interface.py` alone)."""

import ast
import inspect
from pathlib import Path

from engine.interface import Engine
from engine.process import EngineProcess

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


def test_the_engine_process_implements_the_engine_protocol():
    members = _members(Engine)
    assert {"send_frame", "poll", "reset", "set_image", "close", "in_flight", "max_in_flight", "skipped"} <= members
    for name in members:
        declared = getattr(Engine, name, None)
        if callable(declared):
            assert _callable_as(getattr(EngineProcess, name), declared), name
        elif isinstance(declared, property):
            assert isinstance(getattr(EngineProcess, name), property), name
        else:  # a plain attribute, set in __init__
            assert name in inspect.getsource(EngineProcess.__init__), name


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
