"""/metrics: what elbasy counts, summed over every worker of an instance.

The values are read back with prometheus_client's own parser, as a
Prometheus server would read them.
"""

from __future__ import annotations

import re
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import origins
import pytest
import requests
from conftest import Proxy
from mockapis.remote import RemoteMock
from prometheus_client.parser import text_string_to_metric_families
from test_pacing import (  # noqa: F401
    burst,
    elbasy_for,
    rest_request,
    session,
    shopify,
)
from test_pacing import metrics_total as total

from elbasy.metrics import (
    ACCOUNTS_KEPT,
    WAIT_BUCKETS,
    InstanceView,
    MetricsMemory,
    WorkerMetrics,
    exposition,
    quantile,
)

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def parse(text: str) -> tuple[Samples, dict[str, str]]:
    """Every sample by (name, sorted labels), and every family's type."""
    samples: Samples = {}
    types = {}
    for fam in text_string_to_metric_families(text):
        types[fam.name] = fam.type
        for s in fam.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples, types


def dead_pid() -> int:
    """The pid of a process that has exited and been reaped."""
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


# ---------------------------------------------------------------------------------------------
# the memory, without sockets


def test_two_workers_add_up_and_a_gone_workers_gauges_leave() -> None:
    memory = MetricsMemory(2)
    live = WorkerMetrics(memory, 0)
    gone = WorkerMetrics(memory, 1, pid=dead_pid())
    for w, n in ((live, 3), (gone, 2)):
        for _ in range(n):
            w.finished("shopify-rest", 200, "shop|a", 100.0)
            w.waited("shopify-rest", "shop|a", 0.3, 100.0)
        w.queued("shopify-rest", "shop|a", 1, 100.0)
        w.loop_counters.cast("Q")[0] += 5  # the loop's first counter: accepted
    view = InstanceView(memory)
    assert view.workers == 1
    assert dict(view.family("requests")) == {("shopify-rest", "200"): [5.0]}
    # a gone worker's counters stay in the sum, its gauges do not
    assert dict(view.family("queue_depth")) == {("shopify-rest",): [1.0]}
    assert view.loop["accepted"] == 10
    wait = dict(view.family("quota_wait_seconds"))[("shopify-rest",)]
    assert sum(wait[:-1]) == 5 and wait[-1] == pytest.approx(1.5)
    assert wait[WAIT_BUCKETS.index(0.5)] == 5  # 0.3 s falls in (0.2, 0.5]
    (acct,) = view.busiest(10)
    assert (acct.requests, acct.queued) == (5, 1)


def test_a_restarted_worker_carries_on_its_slots_counts() -> None:
    memory = MetricsMemory(1)
    first = WorkerMetrics(memory, 0, pid=dead_pid())
    first.finished("etsy", 200, None, 1.0)
    first.queued("etsy", "k", 1, 1.0)  # held when it died
    again = WorkerMetrics(memory, 0)
    again.finished("etsy", 200, None, 2.0)
    again.queued("etsy", "k", -1, 2.0)  # not its request: the gauge may not go below 0 here
    view = InstanceView(memory)
    assert dict(view.family("requests")) == {("etsy", "200"): [2.0]}


def test_busiest_accounts_are_bounded_and_ranked_by_wait() -> None:
    memory = MetricsMemory(1)
    w = WorkerMetrics(memory, 0)
    for i in range(ACCOUNTS_KEPT + 30):
        w.waited("r", f"acct{i}", i / 100, float(i))
    view = InstanceView(memory)
    busiest = view.busiest(5)
    last = ACCOUNTS_KEPT + 29
    assert [a.account for a in busiest] == [f"acct{i}" for i in range(last, last - 5, -1)]
    assert len(view.accounts) == ACCOUNTS_KEPT


def test_quantile_interpolates_within_a_bucket() -> None:
    counts = [0.0] * (len(WAIT_BUCKETS) + 1)
    assert quantile(0.5, counts) is None
    counts[WAIT_BUCKETS.index(1.0)] = 10  # ten waits in (0.5, 1]
    assert quantile(0.5, counts) == pytest.approx(0.75)
    counts[-1] = 10  # ten beyond the last bound
    assert quantile(0.99, counts) == WAIT_BUCKETS[-1]


def test_the_text_parses_with_prometheus_clients_parser() -> None:
    memory = MetricsMemory(1)
    w = WorkerMetrics(memory, 0, top_accounts=2)
    w.finished("shopify-graphql", 200, "shop|x", 5.0)
    w.waited("shopify-graphql", "shop|x", 0.004, 5.0)
    w.throttled("shopify-graphql", "THROTTLED")
    w.drift("shopify-graphql", "shop|x", -0.25)  # the server counted less than elbasy did
    w.reported("shopify-graphql", "shop|x", 750.0, 1000.0, 5.0)  # the report it came with
    w.error("upstream_errors")
    text, content_type = exposition(InstanceView(memory), 2)
    assert content_type.startswith(b"text/plain; version=0.0.4")
    samples, types = parse(text.decode())
    assert types["elbasy_quota_wait_seconds"] == "histogram"
    assert types["elbasy_requests"] == "counter"
    assert total(samples, "elbasy_requests_total", rule="shopify-graphql", status="200") == 1
    assert total(samples, "elbasy_upstream_throttled_total", kind="THROTTLED") == 1
    assert total(samples, "elbasy_quota_wait_seconds_bucket", le="0.005") == 1
    assert total(samples, "elbasy_quota_wait_seconds_bucket", le="0.002") == 0
    assert total(samples, "elbasy_quota_wait_seconds_count") == 1
    assert total(samples, "elbasy_errors_total", kind="upstream_errors") == 1
    assert total(samples, "elbasy_errors_total", kind="head_timeouts") == 0  # a loop counter
    assert total(samples, "elbasy_account_requests_total", account="shop|x") == 1
    assert total(samples, "elbasy_account_quota_drift_ratio", account="shop|x") == -0.25
    assert total(samples, "elbasy_quota_drift_ratio_bucket", le="0.2") == 0
    assert total(samples, "elbasy_quota_drift_ratio_bucket", le="0.5") == 1


# ---------------------------------------------------------------------------------------------
# a real instance


def scrape(p: Proxy) -> Samples:
    r = requests.get(f"http://127.0.0.1:{p.port}/metrics", timeout=10)
    assert r.status_code == 200
    assert r.headers["Content-Type"].startswith("text/plain; version=0.0.4")
    return parse(r.text)[0]


def test_one_scrape_is_the_whole_instance(
    proxy: Callable[..., Proxy],
    api_ca: tuple[origins.TestCA, Path],  # noqa: F811
    shopify: RemoteMock,  # noqa: F811
    tmp_path: Path,
) -> None:
    """Two workers: whichever one a scrape lands on, it counts every request once,
    shows the requests held for quota while they wait, and their wait after."""
    p, ca = elbasy_for(proxy, api_ca, tmp_path, {"*.myshopify.com": shopify.port}, "--workers", "2")
    first = scrape(p)
    assert total(first, "elbasy_workers") == 2
    # 39 one after another: the bucket of 40 less one of headroom
    assert [st for st, _ in burst(p, ca, "metered", "tok", 39)] == [200] * 39
    # four more on their own connections: each waits for a leak of the bucket (2/s)
    conns = [session(p, ca, "metered") for _ in range(4)]
    answers: list[int] = []

    def send_and_read() -> None:
        for t in conns:
            t.sendall(rest_request("metered", "tok")(0))
        for t in conns:
            answers.append(origins.read_response(origins.Reader(t)).status)

    sender = threading.Thread(target=send_and_read)
    sender.start()
    deadline = time.monotonic() + 5  # until the sender's four are in (a busy machine's thread
    while total(scrape(p), "elbasy_queue_depth") < 3 and time.monotonic() < deadline:
        time.sleep(0.02)  # may start late)
    held = [total(scrape(p), "elbasy_queue_depth") for _ in range(4)]
    sender.join(timeout=30)
    for t in conns:
        t.close()
    assert answers == [200] * 4
    # every scrape (on either worker) saw the held ones: the first leaves ~0.5 s in
    assert all(3 <= n <= 4 for n in held), held
    accepted = shopify.key_stats("metered", "tok")["rest"]["accepted"]
    assert accepted == 43

    def finished(s: Samples) -> float:
        return total(s, "elbasy_requests_total", status="200") - total(
            first, "elbasy_requests_total", status="200"
        )

    # a worker counts an exchange once its last byte left: the client may read it first
    deadline = time.monotonic() + 5
    while finished(scrape(p)) < 43 and time.monotonic() < deadline:
        time.sleep(0.02)
    for _ in range(4):
        s = scrape(p)
        assert finished(s) == 43
        assert total(s, "elbasy_quota_wait_seconds_count") == 43
        # the four waited about 0.5, 1, 1.5 and 2 s
        assert 3.5 < total(s, "elbasy_quota_wait_seconds_sum") < 8
        assert total(s, "elbasy_quota_wait_seconds_bucket", le="0.2") >= 35  # the burst
        assert total(s, "elbasy_queue_depth") == 0
        assert total(s, "elbasy_upstream_throttled_total") == 0
        assert total(s, "elbasy_intercepts_total") >= 5
        assert total(s, "elbasy_bytes_total", direction="up") > 43 * 100
        assert total(s, "elbasy_bytes_total", direction="down") > 43 * 100
        assert total(s, "elbasy_tls_handshakes_total", side="client", result="ok") >= 5
        assert total(s, "elbasy_account_requests_total") == 43
        # Shopify's call limit header on every answer: elbasy's count of the
        # bucket next to the server's, a unit or two apart at most
        drifts = total(s, "elbasy_quota_drift_ratio_count")
        assert drifts >= 43
        assert total(s, "elbasy_quota_drift_ratio_sum") / drifts < 0.05
        assert total(s, "elbasy_quota_drift_ratio_bucket", le="0.1") == drifts
        (account_drift,) = [v for (n, _), v in s.items() if n == "elbasy_account_quota_drift_ratio"]
        assert abs(account_drift) < 0.1
        assert total(s, "elbasy_dns_lookups_total") >= 2  # one upstream connection a worker
        assert total(s, "elbasy_tls_leaf_mints_total") >= 1  # metered.myshopify.com
        assert total(s, "elbasy_upstream_pool_idle") >= 1
        assert total(s, "elbasy_upstream_reused_total") >= 30
    assert shopify.stats()["totals"]["rest_throttled"] == 0


def test_metrics_listen_is_served_by_the_supervisor(
    proxy: Callable[..., Proxy], http_origin: origins.HTTPOrigin
) -> None:
    """--metrics-listen: the same sums on an address of its own, while the
    workers carry plain forwarded requests (rule "none")."""
    p = proxy("--workers", "2", "--metrics-listen", "127.0.0.1:0")
    # port 0: the supervisor says where it listens (a port picked here and
    # closed could be taken by anyone before elbasy binds it)
    found = re.search(r"metrics on http://127\.0\.0\.1:(\d+)/metrics", p.stderr)
    assert found, p.stderr
    port = int(found.group(1))
    proxies = {"http": p.url}
    for _ in range(10):
        r = requests.get(f"http://127.0.0.1:{http_origin.port}/hello", proxies=proxies, timeout=10)
        assert r.status_code == 200
    r = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=10)
    assert r.status_code == 200
    s = parse(r.text)[0]
    assert total(s, "elbasy_workers") == 2
    assert total(s, "elbasy_requests_total", rule="none", status="200") == 10
    assert total(s, "elbasy_connections_total") >= 10
    assert requests.get(f"http://127.0.0.1:{port}/other", timeout=10).status_code == 404
    # the proxy's own address says the same
    assert total(scrape(p), "elbasy_requests_total", rule="none", status="200") == 10


def test_metrics_listen_on_a_taken_port_is_a_startup_error(proxy: Callable[..., Proxy]) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        where = f"127.0.0.1:{taken.getsockname()[1]}"
        proc = subprocess.run(
            [sys.executable, "-m", "elbasy", "--listen", "127.0.0.1:0", "--metrics-listen", where],
            capture_output=True,
            text=True,
            timeout=30,
        )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("Error:")]
    assert errors == [
        f"Error: cannot listen on {where} for --metrics-listen: address already in use "
        "(try --metrics-listen 127.0.0.1:PORT)"
    ]


def straight_to_the_shop(port: int, ca_file: Path, shop: str, token: str, n: int) -> None:
    """n requests sent to the mock Shopify without elbasy: another app on the shop."""
    raw = socket.create_connection(("127.0.0.1", port), timeout=30)
    context = ssl.create_default_context(cafile=str(ca_file))
    with context.wrap_socket(raw, server_hostname=f"{shop}.myshopify.com") as t:
        reader = origins.Reader(t)
        for _ in range(n):
            t.sendall(rest_request(shop, token)(0))
            assert origins.read_response(reader).status == 200


def drift_of(p: Proxy, seen: float) -> tuple[float, float]:
    """The drift samples and the account's last drift, once more than ``seen``
    samples are in (a shared store tells the level when its answer comes back)."""
    deadline = time.monotonic() + 10
    while True:
        s = scrape(p)
        count = total(s, "elbasy_quota_drift_ratio_count")
        if count > seen or time.monotonic() > deadline:
            (account,) = [v for (n, _), v in s.items() if n == "elbasy_account_quota_drift_ratio"]
            return count, account
        time.sleep(0.05)


@pytest.mark.parametrize("store", ["local", "workers", "redis"])
def test_drift_shows_what_another_app_spent(
    proxy: Callable[..., Proxy],
    api_ca: tuple[origins.TestCA, Path],  # noqa: F811
    shopify: RemoteMock,  # noqa: F811
    tmp_path: Path,
    request: pytest.FixtureRequest,
    store: str,
) -> None:
    """Drift compares the server's count of a bucket with the store's, in every
    store: near 0 while elbasy sends everything, and the share another app
    spent on the shop once it has (Shopify's 40-call bucket, 12 spent outside)."""
    extra = {
        "local": (),
        "workers": ("--workers", "2"),
        "redis": ("--quota-store", request.getfixturevalue("redis_url")),
    }[store]
    p, ca = elbasy_for(proxy, api_ca, tmp_path, {"*.myshopify.com": shopify.port}, *extra)
    assert [st for st, _ in burst(p, ca, "drifting", "tok", 5)] == [200] * 5
    count, account = drift_of(p, 4)
    assert count == 5
    assert abs(account) < 0.1, account
    straight_to_the_shop(shopify.port, api_ca[0].path, "drifting", "tok", 12)
    assert [st for st, _ in burst(p, ca, "drifting", "tok", 1)] == [200]
    count, account = drift_of(p, 5)
    assert count == 6
    # 12 of 40 (less what leaked at 2/s meanwhile): the server is ahead of elbasy
    assert 0.2 < account < 0.35, account
