"""The seam between the loop and Python (elbasy/seam.py): what the loop
binds at construction is what the Protocols declare, an object missing a
method is refused at once, and no answer is spelled in the loop's Cython."""

from __future__ import annotations

import os
import re
import socket
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from elbasy import pages, verdicts
from elbasy._loop import Ended, Loop
from elbasy.policy import Exchange, Policy
from elbasy.resolver import Resolver
from elbasy.seam import ClientTLSSeam, PolicySeam, ResolverSeam, ServerTLSSeam
from elbasy.tls import ClientTLS, ServerTLS
from elbasy.verdicts import HEAD_TOO_LARGE, INTERNAL_ERROR, Intercept

LOOP = Path(__file__).resolve().parent.parent / "ext" / "loop"


def members(protocol: type) -> set[str]:
    return {n for n, v in vars(protocol).items() if callable(v) and not n.startswith("_")}


def stub(names: set[str]) -> Any:
    """An object with exactly these methods (each does nothing)."""
    return type("Stub", (), {n: lambda self, *a: None for n in names})()


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.fixture
def listener() -> Any:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield s


@pytest.fixture
def resolver() -> Any:
    r = Resolver(time.monotonic)
    yield r
    r.close()


def test_the_policy_implements_every_method_of_the_seam() -> None:
    assert members(PolicySeam) <= set(dir(Policy))
    assert members(ResolverSeam) <= set(dir(Resolver))
    assert members(ServerTLSSeam) <= set(dir(ServerTLS))
    assert members(ClientTLSSeam) <= set(dir(ClientTLS))


def test_a_policy_missing_methods_is_refused_at_construction_naming_them(
    listener: Any, resolver: Any
) -> None:
    names = members(PolicySeam)
    # a head, a body, a departure, a response head, a captured response
    # body, every ending; and the quota store's wake-up
    assert names == {
        "on_request",
        "on_body",
        "departing",
        "on_response",
        "on_response_body",
        "ended",
        "quota_moved",
    }
    before = open_fds()
    with pytest.raises(TypeError) as err:
        Loop(stub(names - {"departing", "ended"}), resolver, listener.fileno())
    assert str(err.value) == "the policy Stub has no method departing, ended"
    assert open_fds() == before  # refused before any fd was taken


def test_the_loop_binds_exactly_the_methods_the_protocol_declares(
    listener: Any, resolver: Any
) -> None:
    with pytest.raises(TypeError) as err:
        Loop(object(), resolver, listener.fileno())
    missing = str(err.value).split(" has no method ", 1)[1].split(", ")
    assert set(missing) == members(PolicySeam)
    Loop(stub(members(PolicySeam)), resolver, listener.fileno())  # all there: accepted


def test_a_resolver_missing_methods_is_refused(listener: Any) -> None:
    with pytest.raises(TypeError) as err:
        Loop(stub(members(PolicySeam)), stub({"fileno"}), listener.fileno())
    assert str(err.value) == "the resolver Stub has no method lookup, completed"


def test_pages_that_are_not_bytes_are_refused(listener: Any, resolver: Any) -> None:
    bad = pages.LoopPages(b"", b"", b"", "502", b"", b"")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        Loop(stub(members(PolicySeam)), resolver, listener.fileno(), pages=bad)


def test_the_loop_pages_are_whole_answers_that_close() -> None:
    expected = {
        "head_too_large": 431,
        "bad_body": 400,
        "internal_error": 500,
        "bad_gateway": 502,
        "drained": 503,
    }
    for field, status in expected.items():
        data = getattr(pages.LOOP_PAGES, field)
        head, body = data.split(b"\r\n\r\n", 1)
        assert head.startswith(b"HTTP/1.1 %d " % status), field
        assert b"\r\nConnection: close" in head and b"Content-Length: %d" % len(body) in head
    assert b"\r\nRetry-After: 1" in pages.LOOP_PAGES.drained


def test_no_answer_is_spelled_in_the_loops_cython() -> None:
    found = []
    for path in sorted(LOOP.glob("*.p[xy][xi]")):
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if 'b"HTTP/1.1 ' in line:
                found.append(f"{path.name}:{n}: {line.strip()}")
    # the two protocol lines, named once each
    assert len(found) == 2, found
    assert all(re.search(r"cdef bytes (CONTINUE_100|CONNECT_200) = ", f) for f in found), found


def test_every_policy_call_goes_through_a_bound_method() -> None:
    for path in sorted(LOOP.glob("*.p[xy][xi]")):
        text = path.read_text()
        assert "loop.policy." not in text and "loop.resolver." not in text, path.name


class Broken(Policy):
    """A policy whose every answer-spelling call raises: the loop's pages answer."""

    def on_request(self, head: bytes, client: str, site: Intercept | None = None) -> Any:
        raise RuntimeError("on_request is broken")

    def ended(self, ex: Any, end: Ended) -> bytes | None:
        if end.kind in (INTERNAL_ERROR, HEAD_TOO_LARGE):
            raise RuntimeError(f"ended({end.kind}) is broken too")
        return super().ended(ex, end)


def exchange(port: int, data: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(data)
        got = b""
        while chunk := s.recv(65536):
            got += chunk
        return got


def test_a_failing_policy_is_answered_with_the_loops_pages(tmp_path: Path) -> None:
    from elbasy.cli import build_config
    from elbasy.server import Worker

    config = build_config(
        listen="127.0.0.1:0", data_dir=str(tmp_path / "data"), log_level="error"
    )
    worker = Worker(config, Broken)
    thread = threading.Thread(target=worker.serve, daemon=True)
    thread.start()
    try:
        port = worker.address[1]
        got = exchange(port, b"GET http://127.0.0.1:9/ HTTP/1.1\r\nHost: 127.0.0.1:9\r\n\r\n")
        assert got == pages.LOOP_PAGES.internal_error
        # on_request raised, then ended(INTERNAL_ERROR): each call counted once
        assert worker.loop.stats()["counters"]["policy_errors"] == 2
        big = b"GET http://127.0.0.1:9/ HTTP/1.1\r\nX: " + b"a" * 70000 + b"\r\n\r\n"
        assert exchange(port, big) == pages.LOOP_PAGES.head_too_large
        # the loop's own page stood in for the policy's: counted, once
        assert worker.loop.stats()["counters"]["policy_errors"] == 3
    finally:
        worker.stop()
        thread.join(5)
        worker.close()
    assert not thread.is_alive()


def test_a_tls_factory_missing_methods_is_refused(listener: Any, resolver: Any) -> None:
    policy = stub(members(PolicySeam))
    with pytest.raises(TypeError) as err:
        Loop(policy, resolver, listener.fileno(), server_tls=stub({"new_ssl"}))
    assert str(err.value) == "the server TLS Stub has no method failure"
    with pytest.raises(TypeError) as err:
        Loop(policy, resolver, listener.fileno(), client_tls=stub(set()))
    assert str(err.value) == "the client TLS Stub has no method new_ssl, failure"


def test_an_ended_is_a_frozen_value() -> None:
    end = Ended(verdicts.FAILED, 504, reason="timed out")
    assert (end.kind, end.status, end.reason, end.up, end.error, end.sent) == (
        "failed",
        504,
        "timed out",
        0,
        None,
        False,
    )
    with pytest.raises(AttributeError):
        end.status = 200  # type: ignore[misc]
    with pytest.raises(TypeError):
        end.__init__(verdicts.FINISHED)  # type: ignore[misc]


ANSWERING = {
    verdicts.FAILED: Ended(verdicts.FAILED, 502, reason="refused"),
    verdicts.HEAD_TOO_LARGE: Ended(verdicts.HEAD_TOO_LARGE, client="127.0.0.1:1"),
    verdicts.BAD_BODY: Ended(verdicts.BAD_BODY),
    verdicts.BAD_RESPONSE: Ended(verdicts.BAD_RESPONSE, error=ValueError("garbage")),
    verdicts.INTERNAL_ERROR: Ended(verdicts.INTERNAL_ERROR, error=RuntimeError("bug")),
    verdicts.DRAINED: Ended(verdicts.DRAINED, sent=True),
}
SILENT = {
    verdicts.FINISHED: Ended(verdicts.FINISHED, 200, 10, 20, 1000),
    verdicts.ABANDONED: Ended(verdicts.ABANDONED),
    verdicts.TLS_FAILED: Ended(verdicts.TLS_FAILED, reason="unknown CA"),
}


def test_every_kind_of_ending_has_one_answer_or_none() -> None:
    kinds = {v for n, v in vars(verdicts).items() if n.isupper() and isinstance(v, str)}
    assert kinds == set(ANSWERING) | set(SILENT)
    status = {
        verdicts.FAILED: 502,
        verdicts.HEAD_TOO_LARGE: 431,
        verdicts.BAD_BODY: 400,
        verdicts.BAD_RESPONSE: 502,
        verdicts.INTERNAL_ERROR: 500,
        verdicts.DRAINED: 503,
    }
    for kind, end in ANSWERING.items():
        data = Policy(lambda: {}).ended(Exchange("c", "GET", "http://a/"), end)
        assert data is not None and data.startswith(b"HTTP/1.1 %d " % status[kind]), kind
    for kind, end in SILENT.items():
        assert Policy(lambda: {}).ended(Exchange("c", "GET", "http://a/"), end) is None, kind


def test_the_verdicts_built_around_their_constructors_have_every_field() -> None:
    """The policy builds its per-request Forward and ResponsePlan with
    ``verdicts.built`` (tuple.__new__, past the named tuples' __new__): each
    must still carry exactly its fields, of the types the loop reads."""
    policy = Policy(lambda: {}, ("localhost",))
    site = Intercept("localhost", 8443, None, "https://localhost:8443")
    fwd = policy.on_request(
        b"POST /x HTTP/1.1\r\nHost: localhost:8443\r\nContent-Length: 3\r\n\r\n", "c:1", site
    )
    assert type(fwd) is verdicts.Forward and len(fwd) == len(verdicts.Forward._fields)
    assert fwd == verdicts.Forward(
        "localhost", 8443, fwd.head, verdicts.BODY_LENGTH, 3, False, fwd.ticket, True,
        verdicts.NOW, 0, False,
    )
    assert fwd.head.startswith(b"POST /x HTTP/1.1\r\nHost: localhost:8443\r\nVia: 1.1 ")
    plan = policy.on_response(fwd.ticket, b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n")
    assert type(plan) is verdicts.ResponsePlan and len(plan) == len(verdicts.ResponsePlan._fields)
    assert plan == verdicts.ResponsePlan(
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n", 200, verdicts.BODY_LENGTH, 5,
        False, True, True, 0, verdicts.NOW,
    )
