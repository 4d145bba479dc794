"""The policy over bytes alone: verdicts for request and response heads."""

from __future__ import annotations

import json

from elbasy.policy import CONNECT_HEADS_KEPT, Exchange, Policy
from elbasy.verdicts import (
    BODY_CHUNKED,
    BODY_LENGTH,
    BODY_NONE,
    Forward,
    Intercept,
    Reply,
    Tunnel,
)


def proxy() -> Policy:
    return Policy(lambda: {"connections": {"open": 3}, "bytes_spliced": 7, "counters": {}})


def test_connect_becomes_a_tunnel() -> None:
    v = proxy().on_request(b"CONNECT a.example:443 HTTP/1.1\r\n\r\n", "127.0.0.1:1")
    assert isinstance(v, Tunnel)
    assert (v.host, v.port) == ("a.example", 443)


def test_a_repeated_connect_head_gets_the_same_answer_for_each_client() -> None:
    """A worker pool sends the same CONNECT head over and over: the decision is kept,
    the exchange (who asked) is each tunnel's own."""
    p = Policy(lambda: {}, intercept=["*.myshopify.com"])
    head = b"CONNECT shop1.myshopify.com:443 HTTP/1.1\r\nHost: shop1.myshopify.com:443\r\n\r\n"
    first, second = p.on_request(head, "127.0.0.1:1"), p.on_request(head, "127.0.0.1:2")
    assert isinstance(first, Intercept) and isinstance(second, Intercept)
    assert (second.host, second.port) == (first.host, first.port) == ("shop1.myshopify.com", 443)
    assert [v.ticket.client for v in (first, second)] == ["127.0.0.1:1", "127.0.0.1:2"]
    assert second.ticket is not first.ticket
    assert (second.ticket.method, second.ticket.target) == ("CONNECT", "shop1.myshopify.com:443")
    tunnel = b"CONNECT a.example:8443 HTTP/1.1\r\n\r\n"
    assert [type(p.on_request(tunnel, "c")) for _ in range(2)] == [Tunnel, Tunnel]
    # a bad head is refused every time, and never kept
    bad = b"CONNECT a.example HTTP/1.1\r\n\r\n"
    for _ in range(2):
        refused = p.on_request(bad, "c")
        assert isinstance(refused, Reply) and refused.data.startswith(b"HTTP/1.1 400")
    # bounded: distinct heads past the limit start the memory over
    for i in range(CONNECT_HEADS_KEPT + 10):
        p.on_request(f"CONNECT h{i}.example:443 HTTP/1.1\r\n\r\n".encode(), "c")
    assert len(p._connects) <= CONNECT_HEADS_KEPT


def test_absolute_form_is_rewritten_to_origin_form() -> None:
    v = proxy().on_request(
        b"POST http://a.example:8080/p?q=1 HTTP/1.1\r\nHost: wrong\r\nConnection: close, X-Drop\r\n"
        b"X-Drop: 1\r\nProxy-Authorization: Basic eDp5\r\nContent-Length: 4\r\n\r\n",
        "c",
    )
    assert isinstance(v, Forward)
    assert (v.host, v.port, v.body, v.length) == ("a.example", 8080, BODY_LENGTH, 4)
    assert v.head.startswith(b"POST /p?q=1 HTTP/1.1\r\nHost: a.example:8080\r\nVia: 1.1 elbasy-")
    assert v.head.endswith(b"\r\nContent-Length: 4\r\n\r\n")
    assert v.head.count(b"\r\n") == 5
    assert not v.retryable


def test_get_without_body_is_retryable() -> None:
    v = proxy().on_request(b"GET http://a.example/ HTTP/1.1\r\n\r\n", "c")
    assert isinstance(v, Forward)
    assert v.retryable and v.port == 80 and v.body == BODY_NONE


def test_https_absolute_form_is_refused() -> None:
    v = proxy().on_request(b"GET https://a.example/ HTTP/1.1\r\n\r\n", "c")
    assert isinstance(v, Reply) and v.close
    assert v.data.startswith(b"HTTP/1.1 400 ")


def test_healthz_reports_loop_and_policy_counters() -> None:
    p = proxy()
    p.on_request(b"GARBAGE\r\n\r\n", "c")
    v = p.on_request(b"GET /healthz HTTP/1.1\r\n\r\n", "c")
    assert isinstance(v, Reply) and not v.close
    head, body = v.data.split(b"\r\n\r\n", 1)
    assert b"application/json" in head
    doc = json.loads(body)
    assert doc["bytes_spliced"] == 7
    assert doc["counters"]["bad_requests"] == 1
    assert doc["version"]


def test_index_page_tells_how_to_use_elbasy() -> None:
    v = proxy().on_request(b"GET / HTTP/1.1\r\n\r\n", "c")
    assert isinstance(v, Reply)
    assert b"HTTPS_PROXY" in v.data and b"text/html" in v.data


def test_response_plan_strips_hop_by_hop_and_keeps_chunked() -> None:
    ex = Exchange("c", "GET", "http://a/", keep_alive=True)
    plan = proxy().on_response(
        ex, b"HTTP/1.1 200 OK\r\nKeep-Alive: timeout=5\r\nTransfer-Encoding: chunked\r\n\r\n"
    )
    assert plan.head == b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
    assert plan.body == BODY_CHUNKED and plan.keep_client and plan.reuse_upstream


def test_close_delimited_response_closes_the_client() -> None:
    ex = Exchange("c", "GET", "http://a/", keep_alive=True)
    plan = proxy().on_response(ex, b"HTTP/1.1 200 OK\r\n\r\n")
    assert not plan.keep_client and not plan.reuse_upstream
    assert plan.head.endswith(b"Connection: close\r\n\r\n")


def test_interim_response_is_relayed_as_is() -> None:
    ex = Exchange("c", "POST", "http://a/", keep_alive=True)
    plan = proxy().on_response(ex, b"HTTP/1.1 100 Continue\r\n\r\n")
    assert plan.interim and plan.head == b"HTTP/1.1 100 Continue\r\n\r\n"


def test_a_request_that_comes_back_is_a_loop() -> None:
    p = proxy()
    first = p.on_request(b"GET http://a.example/ HTTP/1.1\r\n\r\n", "c")
    assert isinstance(first, Forward)
    # the forwarded head, arriving again as a request to the same elbasy
    again = first.head.replace(b"GET / ", b"GET http://a.example/ ", 1)
    v = p.on_request(again, "c")
    assert isinstance(v, Reply) and v.data.startswith(b"HTTP/1.1 508 ")
    # another elbasy's Via is no loop
    other = proxy().on_request(again, "c")
    assert isinstance(other, Forward)
