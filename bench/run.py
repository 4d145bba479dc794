#!/usr/bin/env python3
"""Load benchmark: elbasy side by side with its peers, on loopback.

One run starts local nginx origins (plain HTTP and HTTPS, a 100-byte object
and a bulk object), HAProxy as a TCP relay in front of the HTTPS origin, and
the proxies (elbasy, squid, tinyproxy, proxy.py, mitmproxy), then measures,
in alternating order over several repeats:

  plain          hey, keep-alive, plain HTTP forwarded through the proxy
  connect        hey, keep-alive, HTTPS through a CONNECT tunnel
  connect-new    hey -disable-keepalive: a new tunnel (and TLS handshake) per request
  bulk           curl, one large object over HTTPS through a CONNECT tunnel
  bulk-plain     the same object over plain HTTP through a CONNECT tunnel (curl
                 -p): no TLS at either end, so the relay, not the endpoints'
                 ciphers, is what the cell is bound by
  idle           process memory per idle CONNECT tunnel (RSS of the process tree)
  intercept      hey, keep-alive, HTTPS through a proxy that terminates TLS with its
                 own CA and forwards on its own TLS connection to the origin
  intercept-new  the same with hey -disable-keepalive: a CONNECT and two TLS
                 handshakes per request
  latency        hey -c 1 over a fixed count: p50/p99 through the intercepting
                 proxy, and the milliseconds it adds to going direct
  reverse        hey, keep-alive, plain HTTP to elbasy's --reverse listener (a base
                 URL, no proxy setting), forwarded over its TLS to the same origin
  transparent    hey, keep-alive, https://localhost:PORT on elbasy's --transparent
                 listener (no proxy setting: the SNI names the host), intercepted and
                 forwarded to the same origin as the interception cells
  transparent-splice
                 the same on the tunnelling instance, where localhost is not
                 intercepted: spliced to the TLS origin (beside the CONNECT cell)
  transparent-new
                 the same with hey -disable-keepalive: a new connection, and so a
                 ClientHello read and a splice set up, per request
  connect-tls    the connect cell through elbasy's --listen-tls listener (hey -x
                 https://): the tunnel relayed through the client's TLS session
  connect-tls-new
                 the same with hey -disable-keepalive (two TLS handshakes each)
  intercept-tls  the intercept cell through --listen-tls: TLS inside TLS

"direct" (no proxy) and "haproxy" (the client talks TLS to HAProxy, which
relays bytes to the origin: a user-space hop without CONNECT) are measured in
the same rotation as reference points.  The interception cells go to
https://localhost:PORT, whose certificate is signed by a bench CA that the
intercepting proxies are told to trust; their reference points are direct
and "nginx-relay": nginx as a TLS-terminating reverse proxy (a leaf for
localhost from a CA of the bench's, proxy_pass https:// to the same origin
over verified, pooled keep-alive connections, one worker), which the client
reaches with the same request but without a CONNECT.  The script prints
one markdown table with medians, ranges and elbasy/peer ratios, then the
targets from docs/design.md §8 with PASS/MISS, the machine and the command line.

Python standard library only; the load generators are hey and curl.  Every
traffic source is bounded in time (hey -z, curl --max-time, deadlines in the
idle-tunnel loop) and in count (--idle-tunnels, hey -n for latency), and
talks to loopback only.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import re
import resource
import shlex
import shutil
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
REPO_DIR = BENCH_DIR.parent
VENVS_DIR = BENCH_DIR / ".venvs"
RESULTS_DIR = BENCH_DIR / "results"

LOOPBACK = "127.0.0.1"
APT_PACKAGES = ["hey", "squid", "tinyproxy", "haproxy", "nginx", "curl", "openssl"]
# Pinned so runs on different days compare like with like.
PIP_PEERS = {
    "proxy.py": ("proxy.py==2.4.10", "proxy"),
    "mitmproxy": ("mitmproxy==11.0.2", "mitmdump"),
}

PROXIES = ["elbasy", "elbasy-w2", "squid", "tinyproxy", "proxy.py", "mitmproxy"]
# nginx terminating the client's TLS and re-encrypting to the origin: a
# reverse proxy (no CONNECT, no pacing decision), the C ceiling for an
# intercepting hop.  Interception cells only.
RELAYS = ["nginx-relay"]
BASELINES = ["direct", "haproxy", *RELAYS]
# elbasy with its tunnel byte path forced one way, to measure the per-flow
# choice "auto" makes (not in the default run; ask with --peers)
ELBASY_VARIANTS = {"elbasy-copy": "never", "elbasy-splice": "always"}
# elbasy with more than one worker process (the default run has one and two
# side by side: what a second worker buys on these two cores)
ELBASY_WORKERS = {"elbasy-w2": 2}
# the targets of the CONNECT cells
TUNNEL_TARGETS = ["direct", "haproxy"] + PROXIES + list(ELBASY_VARIANTS)
ALL_TARGETS = ["direct", "haproxy", *RELAYS] + PROXIES + list(ELBASY_VARIANTS)

# Peers that terminate TLS themselves, each from a second, intercepting
# instance (the first one passes CONNECT tunnels through untouched).
INTERCEPTORS = ["elbasy", "elbasy-w2", "mitmproxy", "proxy.py"]
# "reverse": elbasy's --reverse listener on its intercepting instance, beside the
# nginx relay (the same hop, reached over TLS) and direct
INTERCEPT_CELLS = [
    "intercept",
    "intercept-new",
    "latency",
    "reverse",
    "transparent",
    "intercept-tls",
]
# the cells through elbasy's --listen-tls listener (hey -x https://)
TLS_LISTENER_CELLS = ["connect-tls", "connect-tls-new", "intercept-tls"]
# The intercepted origin is named, not an address: proxies verify its certificate.
TLS_HOST = "localhost"
BENCH_CA_CN = "elbasy bench origin CA"

BULK_CELLS = ["bulk", "bulk-plain"]
CELLS = [
    "plain",
    "connect",
    "connect-new",
    "transparent-splice",
    "transparent-new",
    "connect-tls",
    "connect-tls-new",
    *BULK_CELLS,
    "idle",
    *INTERCEPT_CELLS,
]
CELL_TITLES = {
    "plain": "plain HTTP keep-alive (req/s)",
    "connect": "CONNECT keep-alive (req/s)",
    "connect-new": "CONNECT new tunnel/req (req/s)",
    "bulk": "CONNECT bulk (GB/s)",
    "bulk-plain": "CONNECT bulk, plain origin (GB/s)",
    "idle": "idle tunnel (KiB each)",
    "intercept": "TLS interception keep-alive (req/s)",
    "intercept-new": "TLS interception new conn/req (req/s)",
    "latency": "interception latency p50 / p99 (+added) (ms)",
    "reverse": "reverse proxy keep-alive, --reverse (req/s)",
    "transparent": "TLS interception keep-alive, --transparent (req/s)",
    "transparent-splice": "spliced keep-alive, --transparent (req/s)",
    "transparent-new": "spliced new conn/req, --transparent (req/s)",
    "connect-tls": "CONNECT keep-alive, --listen-tls (req/s)",
    "connect-tls-new": "CONNECT new tunnel/req, --listen-tls (req/s)",
    "intercept-tls": "TLS interception keep-alive, --listen-tls (req/s)",
}
# Which targets each cell applies to.  HAProxy relays the TLS origin (and,
# for bulk-plain, the plain one); it forwards no absolute-form HTTP.  The
# nginx relay is reached like an origin, in the interception cells only.
CELL_TARGETS = {
    "plain": ["direct"] + PROXIES,
    "connect": TUNNEL_TARGETS,
    "connect-new": TUNNEL_TARGETS,
    "bulk": TUNNEL_TARGETS,
    "bulk-plain": TUNNEL_TARGETS,
    "idle": ["haproxy"] + PROXIES,
    "intercept": ["direct", *RELAYS] + INTERCEPTORS,
    "intercept-new": ["direct", *RELAYS] + INTERCEPTORS,
    "latency": ["direct", *RELAYS] + INTERCEPTORS,
    "reverse": ["direct", *RELAYS, "elbasy", "elbasy-w2"],
    "transparent": ["direct", *RELAYS, "elbasy", "elbasy-w2"],
    "transparent-splice": ["direct", "haproxy", "elbasy", "elbasy-w2"],
    "transparent-new": ["direct", "haproxy", "elbasy", "elbasy-w2"],
    "connect-tls": ["direct", "haproxy", "elbasy", "elbasy-w2"],
    "connect-tls-new": ["direct", "haproxy", "elbasy", "elbasy-w2"],
    "intercept-tls": ["direct", *RELAYS, "elbasy", "elbasy-w2"],
}


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def loud(msg: str) -> None:
    bar = "!" * 72
    print(f"\n{bar}\n[bench] {msg}\n{bar}\n", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------
# small helpers


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


def wait_port(port: int, deadline: float) -> bool:
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((LOOPBACK, port), timeout=0.5):
                return True
        except OSError:
            time.sleep(0.1)
    return False


def run(cmd: list[str], timeout: float, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)


def first_line(cmd: list[str]) -> str:
    try:
        p = run(cmd, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"? ({e})"
    out = (p.stdout or p.stderr).strip().splitlines()
    return out[0].strip() if out else "?"


def parse_duration(text: str) -> float:
    m = re.fullmatch(r"\s*([0-9.]+)\s*(ms|s|m)?\s*", text)
    if not m:
        raise argparse.ArgumentTypeError(f"bad duration {text!r} (e.g. 5s, 500ms, 1m)")
    value = float(m.group(1))
    unit = m.group(2) or "s"
    return value / 1000 if unit == "ms" else value * 60 if unit == "m" else value


def parse_size(text: str) -> int:
    m = re.fullmatch(r"\s*([0-9.]+)\s*([KMG]i?B?|B)?\s*", text, re.I)
    if not m:
        raise argparse.ArgumentTypeError(f"bad size {text!r} (e.g. 1GiB, 256MiB)")
    mult = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
    unit = (m.group(2) or "").lower()[:1]
    return int(float(m.group(1)) * mult[unit])


def human_size(n: int) -> str:
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift and n % (1 << shift) == 0:
            return f"{n >> shift}{unit}"
    return f"{n}B"


def raise_nofile() -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


# --------------------------------------------------------------------------
# process-tree memory


def _children_map() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        # comm may hold spaces and parentheses: the fields start after the last ')'.
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        kids.setdefault(ppid, []).append(int(entry))
    return kids


def tree_pids(root: int) -> list[int]:
    kids = _children_map()
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(kids.get(pid, []))
    return out


def rss_kib(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def _start_time(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


def tree_cpu_s(root: int) -> float:
    """User + system CPU seconds of a process tree (threads included): elbasy's
    supervisor and its live workers, plus (the root's cutime and cstime) the
    workers it has reaped, so a restarted worker's CPU is not lost."""
    ticks = 0
    for pid in tree_pids(root):
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            ticks += int(fields[11]) + int(fields[12])
            if pid == root:
                ticks += int(fields[13]) + int(fields[14])
        except (OSError, IndexError, ValueError):
            pass
    return ticks / CLK_TCK


CLK_TCK = os.sysconf("SC_CLK_TCK")


def tree_rss_kib(root: int) -> int:
    return sum(rss_kib(p) for p in tree_pids(root))


# --------------------------------------------------------------------------
# install


def apt_install(packages: list[str]) -> None:
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    cmd = ["apt-get", "install", "-y", "-q", "--no-install-recommends", *packages]
    log(f"apt-get install {' '.join(packages)}")
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    if p.returncode != 0:
        log("apt-get install failed; running apt-get update once and retrying")
        subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True, timeout=900)
        p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
        if p.returncode != 0:
            loud("apt-get install failed:\n" + p.stderr[-2000:])


def venv_bin(name: str) -> Path:
    return VENVS_DIR / name / "bin" / PIP_PEERS[name][1]


def install(skip: bool) -> None:
    if skip:
        return
    binaries = {
        "hey": "hey",
        "squid": "squid",
        "tinyproxy": "tinyproxy",
        "haproxy": "haproxy",
        "nginx": "nginx",
        "curl": "curl",
        "openssl": "openssl",
    }
    missing = [pkg for pkg, exe in binaries.items() if not shutil.which(exe, path=_sbin_path())]
    if missing:
        apt_install(missing)
    for name, (spec, _exe) in PIP_PEERS.items():
        if venv_bin(name).exists():
            continue
        venv = VENVS_DIR / name
        log(f"creating venv {venv} and installing {spec}")
        try:
            subprocess.run(
                [sys.executable, "-m", "venv", str(venv)],
                check=True,
                capture_output=True,
                timeout=300,
            )
            subprocess.run(
                [str(venv / "bin" / "pip"), "install", "-q", spec],
                check=True,
                capture_output=True,
                text=True,
                timeout=1200,
            )
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as e:
            out = getattr(e, "stderr", "") or ""
            loud(f"pip install {spec} failed: {e}\n{str(out)[-2000:]}")


def _sbin_path() -> str:
    return os.environ.get("PATH", "") + ":/usr/sbin:/sbin"


def which(exe: str) -> str | None:
    return shutil.which(exe, path=_sbin_path())


# --------------------------------------------------------------------------
# processes we start


class Proc:
    """A child in its own session, so that stopping it takes its helpers too."""

    def __init__(
        self,
        name: str,
        cmd: list[str],
        workdir: Path,
        env: dict | None = None,
        preexec_fn=None,
    ):
        self.name = name
        self.cmd = cmd
        self.logpath = workdir / f"{name}.log"
        self._logf = open(self.logpath, "wb")
        self.popen = subprocess.Popen(
            cmd,
            stdout=self._logf,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=workdir,
            env=env,
            start_new_session=True,
            preexec_fn=preexec_fn,
        )
        self.pid = self.popen.pid

    def wait_line(self, pattern: str, timeout: float) -> re.Match[str]:
        """The first match of ``pattern`` in the child's log, waiting up to ``timeout``."""
        deadline = time.monotonic() + timeout
        pat = re.compile(pattern)
        while time.monotonic() < deadline and self.popen.poll() is None:
            m = pat.search(self.logpath.read_text(errors="replace"))
            if m:
                return m
            time.sleep(0.1)
        raise SystemExit(f"{self.name} did not start:\n{self.log_tail()}")

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log_tail(self, n: int = 15) -> str:
        try:
            lines = self.logpath.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(lines[-n:])

    def stop(self) -> None:
        # Helpers may start their own session (squid's pinger does), which
        # takes them out of our process group: note the whole tree first.
        tree = (
            [(pid, _start_time(pid)) for pid in tree_pids(self.pid)]
            if self.popen.poll() is None
            else []
        )
        if self.popen.poll() is None:
            try:
                os.killpg(self.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.popen.wait(timeout=8)
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(self.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                self.popen.wait(timeout=5)
        else:
            # The leader is gone; make sure nothing it forked lingers.
            try:
                os.killpg(self.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        for pid, started in tree[1:]:
            if _start_time(pid) != started:
                continue  # gone (and the pid perhaps reused): not ours to touch
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        self._logf.close()


STARTED: list[Proc] = []


def start(name: str, cmd: list[str], workdir: Path, env: dict | None = None) -> Proc:
    p = Proc(name, cmd, workdir, env)
    STARTED.append(p)
    return p


def stop_all() -> None:
    while STARTED:
        STARTED.pop().stop()


# --------------------------------------------------------------------------
# origins


@dataclass
class Origins:
    plain_port: int
    tls_port: int
    bulk_path: str
    bulk_size: int
    proc: Proc
    ca_file: Path  # the bench CA that signed the TLS origin's certificate

    @property
    def plain_small(self) -> str:
        return f"http://{LOOPBACK}:{self.plain_port}/100b"

    @property
    def tls_small(self) -> str:
        return f"https://{LOOPBACK}:{self.tls_port}/100b"

    @property
    def intercept_small(self) -> str:
        return f"https://{TLS_HOST}:{self.tls_port}/100b"

    @property
    def tls_bulk(self) -> str:
        return f"https://{LOOPBACK}:{self.tls_port}{self.bulk_path}"

    @property
    def plain_bulk(self) -> str:
        return f"http://{LOOPBACK}:{self.plain_port}{self.bulk_path}"


def openssl(*args: str) -> None:
    p = run(["openssl", *args], timeout=60)
    if p.returncode != 0:
        raise SystemExit(f"openssl {' '.join(args[:2])} failed:\n{p.stderr[-1500:]}")


def make_ca(workdir: Path, name: str, cn: str, key_type: str = "ec") -> tuple[Path, Path]:
    """A self-signed CA: (key, certificate), PEM, in workdir/name.key and name.crt."""
    key, crt = workdir / f"{name}.key", workdir / f"{name}.crt"
    newkey = (
        ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1"]
        if key_type == "ec"
        else ["-newkey", "rsa:2048"]
    )
    openssl(
        "req", "-x509", *newkey, "-nodes", "-days", "30", "-subj", f"/CN={cn}",
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign",
        "-keyout", str(key), "-out", str(crt),
    )  # fmt: skip
    return key, crt


def make_cert(workdir: Path) -> tuple[Path, Path, Path]:
    """The origin's certificate for localhost and 127.0.0.1, signed by a bench CA
    (not self-signed, so that intercepting proxies can be told to trust the CA).
    Returns (origin key, origin certificate, CA certificate)."""
    ca_key, ca_crt = make_ca(workdir, "bench-ca", BENCH_CA_CN)
    key, crt = make_leaf(workdir, "origin", ca_key, ca_crt)
    return key, crt, ca_crt


def make_leaf(workdir: Path, name: str, ca_key: Path, ca_crt: Path) -> tuple[Path, Path]:
    """A P-256 server certificate for localhost and 127.0.0.1 signed by the CA:
    (key, certificate), PEM, in workdir/name.key and name.crt."""
    key, csr, crt = workdir / f"{name}.key", workdir / f"{name}.csr", workdir / f"{name}.crt"
    ext = workdir / f"{name}.ext"
    ext.write_text(
        f"subjectAltName=DNS:{TLS_HOST},IP:{LOOPBACK}\n"
        "basicConstraints=critical,CA:FALSE\n"
        "keyUsage=critical,digitalSignature\n"
        "extendedKeyUsage=serverAuth\n"
        "subjectKeyIdentifier=hash\n"
        "authorityKeyIdentifier=keyid\n"
    )
    openssl(
        "req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-subj", f"/CN={TLS_HOST}", "-keyout", str(key), "-out", str(csr),
    )  # fmt: skip
    openssl(
        "x509", "-req", "-in", str(csr), "-CA", str(ca_crt), "-CAkey", str(ca_key),
        "-set_serial", str(time.time_ns()), "-days", "30", "-extfile", str(ext),
        "-out", str(crt),
    )  # fmt: skip
    return key, crt


def ipv6_loopback(port: int) -> bool:
    """Whether [::1]:port can be bound (localhost may resolve to ::1 first)."""
    if not socket.has_ipv6:
        return False
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::1", port))
        return True
    except OSError:
        return False


def start_origins(workdir: Path, bulk_size: int) -> Origins:
    www = workdir / "www"
    www.mkdir()
    (www / "100b").write_bytes(b"elbasy bench object: 100 bytes".ljust(99, b".") + b"\n")
    bulk_name = f"bulk-{human_size(bulk_size)}"
    with open(www / bulk_name, "wb") as f:
        f.truncate(bulk_size)  # sparse: costs no disk, reads as zeros
    key, crt, ca_crt = make_cert(workdir)
    plain_port, tls_port = free_port(), free_port()
    # Clients and proxies resolve localhost; where it means ::1 too, answer there.
    listen6 = f"listen [::1]:{tls_port} ssl backlog=4096;" if ipv6_loopback(tls_port) else ""
    ngx = workdir / "nginx"
    ngx.mkdir()
    conf = ngx / "nginx.conf"
    conf.write_text(f"""
worker_processes 1;
worker_rlimit_nofile 20000;
daemon off;
master_process on;
user root;
pid {ngx}/nginx.pid;
error_log {ngx}/error.log crit;
events {{ worker_connections 20000; }}
http {{
    access_log off;
    default_type application/octet-stream;
    sendfile on;
    tcp_nopush on;
    tcp_nodelay on;
    keepalive_timeout 600s;
    keepalive_requests 100000000;
    client_header_timeout 600s;
    client_body_temp_path {ngx}/body;
    proxy_temp_path {ngx}/proxy;
    fastcgi_temp_path {ngx}/fastcgi;
    uwsgi_temp_path {ngx}/uwsgi;
    scgi_temp_path {ngx}/scgi;
    root {www};
    server {{
        listen {LOOPBACK}:{plain_port} backlog=4096;
    }}
    server {{
        listen {LOOPBACK}:{tls_port} ssl backlog=4096;
        {listen6}
        ssl_certificate {crt};
        ssl_certificate_key {key};
        ssl_protocols TLSv1.2 TLSv1.3;
    }}
}}
""")
    proc = start(
        "nginx-origin", [which("nginx") or "nginx", "-c", str(conf), "-p", str(ngx)], workdir
    )
    deadline = time.monotonic() + 15
    if not (wait_port(plain_port, deadline) and wait_port(tls_port, deadline)):
        raise SystemExit(f"nginx origin did not start:\n{proc.log_tail()}")
    return Origins(plain_port, tls_port, "/" + bulk_name, bulk_size, proc, ca_crt)


# --------------------------------------------------------------------------
# peers


@dataclass
class Peer:
    name: str
    procs: list[Proc] = field(default_factory=list)
    connect_port: int = 0  # CONNECT (and for haproxy: the TLS relay port)
    plain_port: int = 0  # absolute-form plain HTTP (for haproxy: the plain origin's relay)
    bulk_port: int = 0  # haproxy only: the TLS relay that always splices, for bulk
    mem_proc: Proc | None = None  # whose process tree holds the idle tunnels
    failed: str = ""  # why the peer is out, if it is
    version: str = ""
    notes: str = ""
    role: str = ""  # "intercept" for a peer's TLS-intercepting instance
    intercept: Peer | None = None  # that instance, when the interception cells run
    ca_file: Path | None = None  # the CA an intercepting instance signs with
    reverse_port: int = 0  # elbasy's intercepting instance: its --reverse listener
    transparent_port: int = 0  # elbasy's --transparent listener (each instance has one)
    tls_port: int = 0  # elbasy's --listen-tls listener (each instance has one)

    @property
    def ok(self) -> bool:
        return not self.failed

    @property
    def label(self) -> str:
        return f"{self.name}-{self.role}" if self.role else self.name

    def for_cell(self, cell: str) -> Peer:
        """The instance that serves a cell: interception has its own, and is out
        (with its reason) when that instance did not come up."""
        if cell not in INTERCEPT_CELLS or self.name == "direct" or self.name in RELAYS:
            return self
        if self.intercept is None:
            self.intercept = Peer(self.name, role="intercept", failed="not started")
        return self.intercept

    def check_alive(self) -> bool:
        for p in self.procs:
            if not p.alive():
                self.fail(f"{p.name} exited with code {p.popen.returncode}:\n{p.log_tail()}")
                return False
        return self.ok

    def cpu_s(self) -> float:
        return sum(tree_cpu_s(p.pid) for p in self.procs if p.alive())

    def fail(self, why: str) -> None:
        if not self.failed:
            lines = [ln.strip() for ln in why.splitlines() if ln.strip()] or ["failed"]
            self.failed = lines[0] + (f" … {lines[-1]}" if len(lines) > 1 else "")
            loud(f"peer {self.label} is out: {why}")
        for p in self.procs:
            p.stop()
            if p in STARTED:
                STARTED.remove(p)


#: the bench's origins listen on loopback, on ports of their own: elbasy's
#: destination rules refuse both unless told (README, Destinations)
LOOPBACK_ORIGINS = ("--allow-internal", "127.0.0.1", "--allow-internal", "localhost",
                    "--allow-ports", "1-65535")  # fmt: skip


def transparent_args(origins: Origins) -> list[str]:
    """elbasy's --transparent listener, and where its clients' name (localhost, as
    hey's SNI says) leads: the TLS origin; and its --listen-tls listener (hey does
    not check the proxy's certificate)."""
    return [
        "--listen-tls",
        f"{LOOPBACK}:0",
        "--transparent",
        f"{LOOPBACK}:0",
        "--connect-to",
        f"{TLS_HOST}:443:{LOOPBACK}:{origins.tls_port}",
    ]


def start_elbasy(
    peer: Peer, workdir: Path, python: str, splice: str = "auto", extra: list[str] | None = None
) -> None:
    workers = ELBASY_WORKERS.get(peer.name, 1)
    chk = run(
        [python, "-c", "import elbasy._loop, elbasy; print(getattr(elbasy, '__version__', '?'))"],
        timeout=60,
        cwd=workdir,
    )
    if chk.returncode != 0:
        err = (chk.stderr.strip().splitlines() or ["?"])[-1]
        peer.fail(
            f"elbasy is not importable with {python} ({err}); "
            f"build it with `pip install -e {REPO_DIR}` or put a built checkout on PYTHONPATH"
        )
        return
    peer.version = "elbasy " + chk.stdout.strip()
    cmd = [python, "-m", "elbasy", "--listen", f"{LOOPBACK}:0", "--log-level", "warning"]
    cmd += ["--splice", splice, "--workers", str(workers), *LOOPBACK_ORIGINS] + (extra or [])
    proc = start(peer.label, cmd, workdir)
    peer.procs = [proc]
    peer.mem_proc = proc
    loops = "one event loop" if workers == 1 else f"{workers} worker processes"
    peer.notes = f"--splice {splice}, --log-level warning ({loops})"
    if extra:
        peer.notes += ", " + shlex.join(extra)
    deadline = time.monotonic() + 20
    pat = re.compile(r"elbasy (\S+) listening on ([0-9.]+):(\d+)")
    while time.monotonic() < deadline and proc.alive():
        m = pat.search(proc.logpath.read_text(errors="replace"))
        if m:
            peer.version = f"elbasy {m.group(1)}"
            peer.connect_port = peer.plain_port = int(m.group(3))
            # a --reverse listener's line comes before the banner
            text = proc.logpath.read_text()
            r = re.search(r"reverse proxy on [0-9.]+:(\d+)", text)
            peer.reverse_port = int(r.group(1)) if r else 0
            t = re.search(r"transparent listener on [0-9.]+:(\d+)", text)
            peer.transparent_port = int(t.group(1)) if t else 0
            s = re.search(r"TLS proxy on [0-9.]+:(\d+)", text)
            peer.tls_port = int(s.group(1)) if s else 0
            return
        time.sleep(0.1)
    peer.fail(f"elbasy printed no 'listening on' line within 20 s:\n{proc.log_tail()}")


def start_squid(peer: Peer, workdir: Path) -> None:
    exe = which("squid")
    if not exe:
        peer.fail("squid not installed")
        return
    d = workdir / "squid"
    d.mkdir(mode=0o777)
    os.chmod(d, 0o777)  # squid drops to the 'proxy' user after reading its config
    port = free_port()
    conf = d / "squid.conf"
    conf.write_text(f"""
http_port {LOOPBACK}:{port}
http_access allow all
workers 1
cache deny all
cache_mem 0 MB
access_log none
cache_store_log none
cache_log {d}/cache.log
logfile_rotate 0
debug_options ALL,0
pid_filename {d}/squid.pid
coredump_dir {d}
netdb_filename none
pinger_enable off
max_filedescriptors 20000
shutdown_lifetime 0 seconds
via off
forwarded_for delete
client_persistent_connections on
server_persistent_connections on
""")
    proc = start("squid", [exe, "-N", "-f", str(conf)], workdir)
    peer.procs, peer.mem_proc = [proc], proc
    peer.connect_port = peer.plain_port = port
    peer.version = first_line([exe, "-v"])
    peer.notes = "workers 1, no cache (cache deny all, cache_mem 0), access_log none"


def start_tinyproxy(peer: Peer, workdir: Path) -> None:
    exe = which("tinyproxy")
    if not exe:
        peer.fail("tinyproxy not installed")
        return
    d = workdir / "tinyproxy"
    d.mkdir()
    os.chmod(d, 0o777)  # it runs as nobody
    port = free_port()
    conf = d / "tinyproxy.conf"
    conf.write_text(f"""
User nobody
Group nogroup
Port {port}
Listen {LOOPBACK}
Timeout 600
MaxClients 12000
LogLevel Critical
LogFile "{d}/tinyproxy.log"
DisableViaHeader Yes
""")
    proc = start("tinyproxy", [exe, "-d", "-c", str(conf)], workdir)
    peer.procs, peer.mem_proc = [proc], proc
    peer.connect_port = peer.plain_port = port
    peer.version = first_line([exe, "-v"])
    peer.notes = "thread per connection (its only model), MaxClients 12000, LogLevel Critical"


def start_proxypy(peer: Peer, workdir: Path, extra: list[str] | None = None) -> None:
    exe = venv_bin("proxy.py")
    if not exe.exists():
        peer.fail(f"proxy.py not installed ({exe} missing)")
        return
    port = free_port()
    cmd = [
        str(exe),
        "--hostname",
        LOOPBACK,
        "--port",
        str(port),
        "--num-acceptors",
        "1",
        "--num-workers",
        "1",
        "--threadless",
        "--timeout",
        "600",
        "--open-file-limit",
        "20000",
        "--log-level",
        "WARNING",
    ] + (extra or [])
    proc = start(peer.label, cmd, workdir)
    peer.procs, peer.mem_proc = [proc], proc
    peer.connect_port = peer.plain_port = port
    ver = run(
        [
            str(exe.parent / "python"),
            "-c",
            "import importlib.metadata as m; print(m.version('proxy.py'))",
        ],
        timeout=60,
    )
    peer.version = f"proxy.py {ver.stdout.strip()}"
    peer.notes = "--threadless --num-acceptors 1 --num-workers 1, --timeout 600"


def start_mitmproxy(peer: Peer, workdir: Path) -> None:
    exe = venv_bin("mitmproxy")
    if not exe.exists():
        peer.fail(f"mitmproxy not installed ({exe} missing)")
        return
    confdir = workdir / "mitmproxy"
    confdir.mkdir()
    common = [
        str(exe),
        "--listen-host",
        LOOPBACK,
        "-q",
        "--set",
        f"confdir={confdir}",
        "--set",
        "termlog_verbosity=error",
    ]
    # Passthrough instance for CONNECT cells: every host ignored, so it
    # tunnels bytes instead of intercepting TLS.  A second, ordinary instance
    # forwards plain HTTP.
    cport, pport = free_port(), free_port()
    tun = start("mitmproxy-tunnel", common + ["-p", str(cport), "--ignore-hosts", ".*"], workdir)
    fwd = start("mitmproxy-plain", common + ["-p", str(pport)], workdir)
    peer.procs, peer.mem_proc = [tun, fwd], tun
    peer.connect_port, peer.plain_port = cport, pport
    peer.version = first_line([str(exe), "--version"])
    peer.notes = (
        "mitmdump -q; CONNECT cells on an --ignore-hosts '.*' (passthrough) instance, "
        "plain HTTP on a default one"
    )


def start_elbasy_intercept(peer: Peer, workdir: Path, python: str, origins: Origins) -> None:
    data = workdir / "elbasy-data"  # elbasy creates its CA there on first run
    extra = [
        "--intercept",
        TLS_HOST,
        "--data-dir",
        str(data),
        "--upstream-ca",
        str(origins.ca_file),
        "--reverse",
        f"{LOOPBACK}:0=https://{TLS_HOST}:{origins.tls_port}",
        *transparent_args(origins),
    ]
    start_elbasy(peer, workdir, python, extra=extra)
    peer.ca_file = data / "ca.pem"


def start_mitmproxy_intercept(peer: Peer, workdir: Path, origins: Origins) -> None:
    exe = venv_bin("mitmproxy")
    if not exe.exists():
        peer.fail(f"mitmproxy not installed ({exe} missing)")
        return
    confdir = workdir / "mitmproxy-intercept"  # its own CA, made on first start
    confdir.mkdir()
    port = free_port()
    cmd = [
        str(exe),
        "--listen-host",
        LOOPBACK,
        "-p",
        str(port),
        "-q",
        "--set",
        f"confdir={confdir}",
        "--set",
        "termlog_verbosity=error",
        "--set",
        f"ssl_verify_upstream_trusted_ca={origins.ca_file}",
    ]
    proc = start(peer.label, cmd, workdir)
    peer.procs, peer.mem_proc = [proc], proc
    peer.connect_port = port
    peer.ca_file = confdir / "mitmproxy-ca-cert.pem"
    peer.version = first_line([str(exe), "--version"])
    peer.notes = (
        "mitmdump -q, an ordinary (intercepting) instance with its own confdir CA, "
        "upstream verified against the bench CA (ssl_verify_upstream_trusted_ca)"
    )


def start_proxypy_intercept(peer: Peer, workdir: Path, origins: Origins) -> None:
    """proxy.py 2.4.10 intercepts every CONNECT once given a CA.  It verifies the
    upstream (CERT_REQUIRED, host name checked) against --ca-file only, whose
    default (certifi/cacert.pem in its site-packages) pip does not install with
    it: every interception would fail.  Point it at the bench CA."""
    d = workdir / "proxypy-intercept"
    d.mkdir()
    ca_key, ca_crt = make_ca(d, "ca", "proxy.py bench interception CA", key_type="rsa")
    signing_key = d / "signing.key"  # the key of every leaf it generates
    openssl("genrsa", "-out", str(signing_key), "2048")
    certs = d / "certs"
    certs.mkdir()
    extra = [
        "--ca-key-file",
        str(ca_key),
        "--ca-cert-file",
        str(ca_crt),
        "--ca-signing-key-file",
        str(signing_key),
        "--ca-cert-dir",
        str(certs),
        "--ca-file",
        str(origins.ca_file),
    ]
    start_proxypy(peer, workdir, extra)
    peer.ca_file = ca_crt
    if peer.ok:
        peer.notes += (
            ", TLS interception (--ca-*-file), upstream verified with --ca-file <bench CA>"
        )


def _haproxy_relay(name: str, port: int, origin_port: int, options: list[str]) -> str:
    """One HAProxy frontend and backend relaying a loopback port to an origin port."""
    opts = "".join(f"    option {o}\n" for o in options)
    return (
        f"frontend {name}\n    bind {LOOPBACK}:{port}\n{opts}    default_backend {name}_origin\n"
        f"backend {name}_origin\n{opts}    server origin {LOOPBACK}:{origin_port}\n"
    )


def start_haproxy(peer: Peer, workdir: Path, origins: Origins) -> None:
    exe = which("haproxy")
    if not exe:
        peer.fail("haproxy not installed")
        return
    d = workdir / "haproxy"
    d.mkdir()
    port, bulk_port, plain_port = free_port(), free_port(), free_port()
    # HAProxy refuses to start when maxconn needs more fds than the hard limit
    # (about 2 per connection plus a reserve).
    maxconn = max(1000, min(20000, (resource.getrlimit(resource.RLIMIT_NOFILE)[1] - 5000) // 2))
    conf = d / "haproxy.cfg"
    # small messages: HAProxy splices only when it expects it to pay; bulk:
    # always splice, its fastest relay for a large object (about twice
    # splice-auto's rate on the plain origin here)
    auto, always = ["splice-auto"], ["splice-request", "splice-response"]
    relays = [
        ("relay", port, origins.tls_port, auto),
        ("relay_bulk", bulk_port, origins.tls_port, always),
        ("relay_plain", plain_port, origins.plain_port, always),
    ]
    conf.write_text(
        f"""
global
    nbthread 1
    maxconn {maxconn}
defaults
    mode tcp
    timeout connect 5s
    timeout client 600s
    timeout server 600s
"""
        + "".join(_haproxy_relay(*r) for r in relays)
    )
    proc = start("haproxy", [exe, "-db", "-f", str(conf)], workdir)
    peer.procs, peer.mem_proc = [proc], proc
    peer.connect_port, peer.bulk_port, peer.plain_port = port, bulk_port, plain_port
    peer.version = first_line([exe, "-v"])
    peer.notes = (
        "mode tcp, nbthread 1, option splice-auto (bulk cells: splice-request and "
        "splice-response, always splicing); the client speaks TLS to it, no CONNECT"
    )


RELAY_CA_CN = "elbasy bench relay CA"
# idle upstream connections nginx keeps per worker: elbasy's pool holds up to 256
RELAY_KEEPALIVE = 256


def start_nginx_relay(peer: Peer, workdir: Path, origins: Origins) -> None:
    """nginx terminating TLS for localhost with a leaf from a CA of the bench's
    own, and forwarding each request on a verified, pooled TLS connection to
    the origin: what an intercepting proxy does once it has the request, without
    the CONNECT before it and without a pacing decision.  One worker."""
    exe = which("nginx")
    if not exe:
        peer.fail("nginx not installed")
        return
    d = workdir / "nginx-relay"
    d.mkdir()
    ca_key, ca_crt = make_ca(d, "ca", RELAY_CA_CN)
    key, leaf = make_leaf(d, "leaf", ca_key, ca_crt)
    # leaf and CA, the chain elbasy sends with its leaves
    chain = d / "chain.pem"
    chain.write_text(leaf.read_text() + ca_crt.read_text())
    port = free_port()
    listen6 = f"listen [::1]:{port} ssl backlog=4096;" if ipv6_loopback(port) else ""
    conf = d / "nginx.conf"
    conf.write_text(f"""
worker_processes 1;
worker_rlimit_nofile 20000;
daemon off;
master_process on;
user root;
pid {d}/nginx.pid;
error_log {d}/error.log error;
events {{ worker_connections 20000; }}
http {{
    access_log off;
    tcp_nodelay on;
    keepalive_timeout 600s;
    keepalive_requests 100000000;
    client_header_timeout 600s;
    client_body_temp_path {d}/body;
    proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fastcgi;
    uwsgi_temp_path {d}/uwsgi;
    scgi_temp_path {d}/scgi;
    upstream bench_origin {{
        server {LOOPBACK}:{origins.tls_port};
        keepalive {RELAY_KEEPALIVE};
        keepalive_requests 100000000;
        keepalive_timeout 600s;
    }}
    server {{
        listen {LOOPBACK}:{port} ssl backlog=4096;
        {listen6}
        ssl_certificate {chain};
        ssl_certificate_key {key};
        ssl_protocols TLSv1.2 TLSv1.3;
        ssl_conf_command NumTickets 1;
        location / {{
            proxy_pass https://bench_origin;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host $http_host;
            proxy_ssl_protocols TLSv1.2 TLSv1.3;
            proxy_ssl_verify on;
            proxy_ssl_trusted_certificate {origins.ca_file};
            proxy_ssl_server_name on;
            proxy_ssl_name {TLS_HOST};
            proxy_ssl_session_reuse on;
        }}
    }}
}}
""")
    proc = start(peer.name, [exe, "-c", str(conf), "-p", str(d)], workdir)
    peer.procs, peer.mem_proc = [proc], proc
    peer.connect_port = port
    peer.ca_file = ca_crt
    peer.version = first_line([exe, "-v"]).removeprefix("nginx version: ")
    peer.notes = (
        "reverse proxy, no CONNECT: worker_processes 1, TLS 1.2–1.3 with a P-256 leaf "
        f"(+ CA) for {TLS_HOST}, ssl_conf_command NumTickets 1 (elbasy's setting); "
        f"proxy_pass https:// to upstream {{ keepalive {RELAY_KEEPALIVE}; }}, "
        'proxy_http_version 1.1, Connection "", Host $http_host, proxy_ssl_verify on '
        f"(bench CA), proxy_ssl_server_name on, proxy_ssl_name {TLS_HOST}; access_log off"
    )


def _wait_listening(peer: Peer, deadline: float) -> bool:
    for port in {peer.connect_port, peer.plain_port} - {0}:
        if not wait_port(port, deadline):
            peer.check_alive()
            tails = "\n".join(p.log_tail() for p in peer.procs)
            peer.fail(f"not listening on port {port} after 30 s:\n{tails}")
            return False
    return True


def _curl_until_200(
    peer: Peer, cmd: list[str], deadline: float, write_out: str = "%{http_code}"
) -> str | None:
    """Retry one curl until it answers 200 or the deadline passes; its -w output
    (first line: the status), or None once the peer has been failed."""
    last = ""
    while time.monotonic() < deadline:
        try:
            p = run(
                cmd[:1] + ["-s", "-o", "/dev/null", "-w", write_out, "--max-time", "5"] + cmd[1:],
                timeout=10,
            )
            status = (p.stdout.splitlines() or [""])[0].strip()
            last = f"exit {p.returncode}, HTTP {status} {p.stderr.strip()}"
            if status == "200":
                return p.stdout
        except subprocess.TimeoutExpired:
            last = "curl timed out"
        time.sleep(0.3)
    tails = "\n".join(p.log_tail() for p in peer.procs)
    peer.fail(f"probe `{' '.join(cmd)}` failed ({last}):\n{tails}")
    return None


def probe(peer: Peer, origins: Origins) -> None:
    """Wait for the peer to listen, then push one request through each path it serves."""
    if peer.name in RELAYS:
        probe_intercept(peer, origins)
        return
    if not peer.ok:
        return
    deadline = time.monotonic() + 30
    if not _wait_listening(peer, deadline):
        return
    checks = []
    if peer.name == "haproxy":
        checks.append(["curl", "-k", f"https://{LOOPBACK}:{peer.connect_port}/100b"])
    else:
        checks.append(
            ["curl", "-k", "-x", f"http://{LOOPBACK}:{peer.connect_port}", origins.tls_small]
        )
        checks.append(["curl", "-x", f"http://{LOOPBACK}:{peer.plain_port}", origins.plain_small])
    for cmd in checks:
        if _curl_until_200(peer, cmd, deadline) is None:
            return


def leaf_issuer(certs: str) -> str:
    """The Issuer of the first certificate in curl's %{certs} output."""
    m = re.search(r"^Issuer:\s*(.+)$", certs, re.M)
    return m.group(1).strip() if m else "?"


def probe_intercept(peer: Peer, origins: Origins) -> None:
    """Check that an intercepting instance really intercepts: a client that trusts
    only the proxy's CA gets the object from https://localhost:PORT, and the leaf
    it sees was issued by that CA.  A tunnel passed through would show the
    origin's leaf, issued by the bench CA, and fail verification.  The nginx
    relay gets the same URL, its connection sent to the relay's port."""
    if not peer.ok:
        return
    deadline = time.monotonic() + 30
    if not _wait_listening(peer, deadline):
        return
    if peer.name in RELAYS:
        route = ["--connect-to", f"{TLS_HOST}:{origins.tls_port}:{LOOPBACK}:{peer.connect_port}"]
    else:
        route = ["-x", f"http://{LOOPBACK}:{peer.connect_port}"]
    cmd = ["curl", "--cacert", str(peer.ca_file), *route]
    out = _curl_until_200(peer, cmd + [origins.intercept_small], deadline, "%{http_code}\n%{certs}")
    if out is None:
        return
    issuer = leaf_issuer(out)
    if BENCH_CA_CN in issuer:
        peer.fail(f"does not intercept: the client saw the origin's own leaf (issuer {issuer})")
        return
    peer.notes += f"; leaf seen by the client issued by {issuer}"


def start_peers(names: list[str], workdir: Path, origins: Origins, args) -> dict[str, Peer]:
    peers: dict[str, Peer] = {}
    intercepting = bool(set(args.cells) & set(INTERCEPT_CELLS))
    for name in names:
        if name in RELAYS and not intercepting:
            continue  # a reference point of the interception cells only
        peer = Peer(name)
        peers[name] = peer
        if name == "direct":
            peer.version = "no proxy"
            peer.notes = "hey/curl straight to the nginx origin"
            continue
        if name in RELAYS:
            start_peer(peer, workdir, origins, args)
            continue
        if any(name in CELL_TARGETS[c] for c in args.cells if c not in INTERCEPT_CELLS):
            start_peer(peer, workdir, origins, args)
        if name in INTERCEPTORS and intercepting:
            peer.intercept = Peer(name, role="intercept")
            start_intercepting(peer.intercept, workdir, origins, args)
            peer.version = peer.version or peer.intercept.version
    return peers


def start_intercepting(peer: Peer, workdir: Path, origins: Origins, args) -> None:
    log(f"starting {peer.label}")
    try:
        if peer.name == "elbasy" or peer.name in ELBASY_WORKERS:
            start_elbasy_intercept(peer, workdir, args.elbasy_python, origins)
        elif peer.name == "mitmproxy":
            start_mitmproxy_intercept(peer, workdir, origins)
        elif peer.name == "proxy.py":
            start_proxypy_intercept(peer, workdir, origins)
        probe_intercept(peer, origins)
    except Exception as e:  # out of the interception cells only
        peer.fail(f"could not start: {e!r}")
    if peer.ok:
        log(f"{peer.label} ready ({peer.version})")


def start_peer(peer: Peer, workdir: Path, origins: Origins, args) -> None:
    name = peer.name
    log(f"starting {name}")
    try:
        if name == "elbasy" or name in ELBASY_WORKERS:
            start_elbasy(peer, workdir, args.elbasy_python, extra=transparent_args(origins))
        elif name in ELBASY_VARIANTS:
            start_elbasy(peer, workdir, args.elbasy_python, ELBASY_VARIANTS[name])
        elif name == "squid":
            start_squid(peer, workdir)
        elif name == "tinyproxy":
            start_tinyproxy(peer, workdir)
        elif name == "proxy.py":
            start_proxypy(peer, workdir)
        elif name == "mitmproxy":
            start_mitmproxy(peer, workdir)
        elif name == "haproxy":
            start_haproxy(peer, workdir, origins)
        elif name == "nginx-relay":
            start_nginx_relay(peer, workdir, origins)
        probe(peer, origins)
    except Exception as e:  # a peer that cannot start must not sink the run
        peer.fail(f"could not start: {e!r}")
    if peer.ok:
        log(f"{name} ready ({peer.version})")


# --------------------------------------------------------------------------
# measurements

HEY_FLOAT = r"([0-9.]+|NaN)"


def parse_hey(out: str) -> dict:
    res: dict = {}
    m = re.search(r"Total:\s+" + HEY_FLOAT + " secs", out)
    res["total_s"] = float(m.group(1)) if m else None
    m = re.search(r"Requests/sec:\s+" + HEY_FLOAT, out)
    res["hey_rps"] = float(m.group(1)) if m else None
    res["latency"] = {
        f"p{pct}": float(v) for pct, v in re.findall(r"^\s+(\d+)% in ([0-9.]+) secs", out, re.M)
    }
    codes = {int(c): int(n) for c, n in re.findall(r"^\s+\[(\d{3})\]\s+(\d+) responses", out, re.M)}
    res["status"] = codes
    errs = 0
    m = re.search(r"Error distribution:\n(.*)", out, re.S)
    samples = []
    if m:
        for n, text in re.findall(r"^\s+\[(\d+)\]\s+(.*)$", m.group(1), re.M):
            errs += int(n)
            if len(samples) < 3:
                samples.append(text[:200])
    ok = sum(n for c, n in codes.items() if 200 <= c < 300)
    res["ok"] = ok
    res["errors"] = errs + sum(n for c, n in codes.items() if not 200 <= c < 300)
    res["error_samples"] = samples
    # Count only good answers: hey's Requests/sec includes failures, which can be fast.
    res["value"] = ok / res["total_s"] if res["total_s"] else 0.0
    return res


def intercept_route(target: Peer, origins: Origins) -> list[str]:
    """hey's arguments for an interception cell, the URL last.  Every target gets
    the same request, `GET /100b` with `Host: localhost:ORIGIN`: through the
    proxy's CONNECT, straight to the origin, or (the nginx relay) to the relay's
    TLS port with the origin's Host (hey's SNI is localhost either way)."""
    if target.name in RELAYS:
        return [
            "-host",
            f"{TLS_HOST}:{origins.tls_port}",
            f"https://{TLS_HOST}:{target.connect_port}/100b",
        ]
    if target.name == "direct":
        return [origins.intercept_small]
    return ["-x", f"http://{LOOPBACK}:{target.connect_port}", origins.intercept_small]


def hey_cell(cell: str, target: Peer, origins: Origins, args) -> dict:
    cmd = ["hey", "-z", f"{args.duration}s", "-c", str(args.concurrency), "-t", "10"]
    if cell in ("connect-new", "intercept-new", "connect-tls-new", "transparent-new"):
        cmd.append("-disable-keepalive")
    if cell in TLS_LISTENER_CELLS and target.name.startswith("elbasy"):
        url = origins.intercept_small if cell == "intercept-tls" else origins.tls_small
        proxy_url = f"https://{LOOPBACK}:{target.tls_port}"
        return run_hey(cmd + ["-x", proxy_url, url], timeout=args.duration + 40)
    if cell in ("connect-tls", "connect-tls-new") and target.name == "direct":
        return run_hey(cmd + [origins.tls_small], timeout=args.duration + 40)
    if cell == "reverse" and target.name not in ("direct", *RELAYS):
        # a base URL on elbasy's --reverse listener: no proxy, no TLS to elbasy
        url = f"http://{LOOPBACK}:{target.reverse_port}/100b"
        return run_hey(cmd + [url], timeout=args.duration + 40)
    if cell in ("transparent", "transparent-splice", "transparent-new") and target.name.startswith(
        "elbasy"
    ):
        # no proxy setting: the client dials elbasy by the origin's name (hey sends
        # an SNI only when -host names one)
        url = f"https://{TLS_HOST}:{target.transparent_port}/100b"
        return run_hey(cmd + ["-host", TLS_HOST, url], timeout=args.duration + 40)
    if cell in ("transparent-splice", "transparent-new") and target.name == "direct":
        return run_hey(cmd + [origins.intercept_small], timeout=args.duration + 40)
    if cell in INTERCEPT_CELLS:
        return run_hey(cmd + intercept_route(target, origins), timeout=args.duration + 40)
    if target.name == "haproxy":
        url = f"https://{LOOPBACK}:{target.connect_port}/100b"
    elif cell == "plain":
        url = origins.plain_small
        if target.name != "direct":
            cmd += ["-x", f"http://{LOOPBACK}:{target.plain_port}"]
    else:
        url = origins.tls_small
        if target.name != "direct":
            cmd += ["-x", f"http://{LOOPBACK}:{target.connect_port}"]
    cmd.append(url)
    return run_hey(cmd, timeout=args.duration + 40)


def latency_cell(target: Peer, origins: Origins, args) -> dict:
    """One client, one keep-alive connection, a fixed count of requests: p50 and
    p99 per request (ms; hey reports 0.1 ms steps).  The value is the p50."""
    cmd = ["hey", "-n", str(args.latency_requests), "-c", "1", "-t", "10"]
    res = run_hey(cmd + intercept_route(target, origins), timeout=args.latency_timeout)
    lat = res.get("latency", {})
    if "p50" in lat and "p99" in lat and res.get("ok"):
        res["value"] = lat["p50"] * 1000
        res["p99_ms"] = lat["p99"] * 1000
    else:
        res.update(value=0.0, p99_ms=None, errors=max(res.get("errors", 0), 1))
    return res


def run_hey(cmd: list[str], timeout: float) -> dict:
    try:
        p = run(cmd, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {
            "value": 0.0,
            "errors": 1,
            "error_samples": [f"hey did not finish in {timeout:g} s"],
            "cmd": cmd,
        }
    res = parse_hey(p.stdout)
    res["cmd"] = cmd
    if not res["ok"]:
        res["errors"] = max(res["errors"], 1)
        res["error_samples"].append(
            f"no 2xx at all (hey exit {p.returncode}): {p.stderr.strip()[:200]}"
        )
    return res


def bulk_cell(target: Peer, origins: Origins, args, tls: bool = True) -> dict:
    """One bulk download through ``target`` (``tls``: from the HTTPS origin,
    else from the plain one through a CONNECT tunnel all the same)."""
    cmd = [
        "curl",
        "-s",
        "-k",
        "--http1.1",
        "-o",
        "/dev/null",
        "--max-time",
        str(args.bulk_timeout),
        "-w",
        "%{http_code} %{size_download} %{speed_download} %{time_total}",
    ]
    if target.name == "haproxy":
        url = f"https://{LOOPBACK}:{target.bulk_port}{origins.bulk_path}"
        if not tls:
            url = f"http://{LOOPBACK}:{target.plain_port}{origins.bulk_path}"
    else:
        url = origins.tls_bulk if tls else origins.plain_bulk
        if target.name != "direct":
            # -p: a CONNECT tunnel for the http:// URL too, not absolute-form forwarding
            cmd += ["-x", f"http://{LOOPBACK}:{target.connect_port}"] + ([] if tls else ["-p"])
    cmd.append(url)
    try:
        p = run(cmd, timeout=args.bulk_timeout + 20)
    except subprocess.TimeoutExpired:
        return {
            "value": 0.0,
            "errors": 1,
            "error_samples": ["curl did not finish in time"],
            "cmd": cmd,
        }
    parts = p.stdout.split()
    res: dict = {"cmd": cmd, "errors": 0, "error_samples": []}
    try:
        code, size, speed, total = parts[0], int(float(parts[1])), float(parts[2]), float(parts[3])
    except (IndexError, ValueError):
        code, size, speed, total = "?", 0, 0.0, 0.0
    res.update(http_code=code, bytes=size, time_s=total, value=speed / 1e9)
    if p.returncode != 0 or code != "200" or size != origins.bulk_size:
        res["errors"] = 1
        res["error_samples"].append(
            f"curl exit {p.returncode}, HTTP {code}, {size} of {origins.bulk_size} bytes"
        )
    return res


def _recv_head(sock: socket.socket, limit: int = 8192) -> bytes:
    buf = b""
    while b"\r\n\r\n" not in buf and len(buf) < limit:
        chunk = sock.recv(4096)
        if not chunk:
            break
        buf += chunk
    return buf


def idle_cell(target: Peer, origins: Origins, args) -> dict:
    """Hold N idle tunnels open through the peer and weigh its process tree."""
    n = args.idle_tunnels
    root = target.mem_proc.pid
    deadline = time.monotonic() + args.idle_timeout
    connect_req = (
        f"CONNECT {LOOPBACK}:{origins.tls_port} HTTP/1.1\r\n"
        f"Host: {LOOPBACK}:{origins.tls_port}\r\n\r\n"
    ).encode()
    relay = target.name == "haproxy"
    tls_ctx = None
    if args.idle_tls:
        tls_ctx = ssl.create_default_context()
        tls_ctx.check_hostname = False
        tls_ctx.verify_mode = ssl.CERT_NONE

    def open_batch(count: int) -> tuple[list[socket.socket], int, list[str]]:
        socks, bad, samples = [], 0, []
        pending = []
        for _ in range(count):
            left = deadline - time.monotonic()
            if left <= 0:
                break
            try:
                s = socket.create_connection((LOOPBACK, target.connect_port), timeout=min(10, left))
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                if not relay:
                    s.sendall(connect_req)
                pending.append(s)
            except OSError as e:
                bad += 1
                if len(samples) < 3:
                    samples.append(f"connect: {e}")
        for s in pending:
            try:
                # Every read is bounded by the cell's deadline too.
                s.settimeout(max(0.05, min(10, deadline - time.monotonic())))
                if not relay:
                    head = _recv_head(s)
                    if not re.match(rb"HTTP/1\.[01] 200", head):
                        raise OSError(f"CONNECT answered {head[:60]!r}")
                if tls_ctx is not None:
                    # Do one TLS handshake with the origin through the tunnel, then idle:
                    # what a pooled HTTPS connection looks like to the proxy.
                    t = tls_ctx.wrap_socket(s, server_hostname="localhost")
                    s = t
                socks.append(s)
            except OSError as e:
                bad += 1
                if len(samples) < 3:
                    samples.append(str(e)[:200])
                s.close()
        return socks, bad, samples

    # Warm up the paths (lazy allocations, worker spawn), then take the baseline.
    warm, _, _ = open_batch(20)
    for s in warm:
        s.close()
    time.sleep(1.0)
    before = tree_rss_kib(root)
    held: list[socket.socket] = []
    failures, samples = 0, []
    try:
        while len(held) < n and time.monotonic() < deadline and failures < 50:
            socks, bad, smp = open_batch(min(100, n - len(held)))
            held += socks
            failures += bad
            samples += smp[: max(0, 3 - len(samples))]
        time.sleep(2.0)  # let the proxy settle
        after = tree_rss_kib(root)
        # How many are still open (the proxy might have dropped some)?
        still = 0
        for s in held:
            try:
                s.setblocking(False)
                data = (
                    s.recv(1, socket.MSG_PEEK)
                    if not isinstance(s, ssl.SSLSocket)
                    else socket.socket.recv(s, 1, socket.MSG_PEEK)
                )
                if data:
                    still += 1
            except (BlockingIOError, ssl.SSLWantReadError):
                still += 1
            except OSError:
                pass
    finally:
        for s in held:
            try:
                s.close()
            except OSError:
                pass
    opened = len(held)
    per = (after - before) / opened if opened else 0.0
    res = {
        "value": per,
        "tunnels_requested": n,
        "tunnels_opened": opened,
        "tunnels_held": still,
        "rss_before_kib": before,
        "rss_after_kib": after,
        "errors": failures + (opened - still),
        "error_samples": samples,
    }
    if opened < n:
        res["error_samples"].append(f"opened only {opened} of {n} tunnels")
        res["errors"] = max(res["errors"], 1)
    if opened != still:
        res["error_samples"].append(
            f"{opened - still} tunnels closed by the peer before the measure"
        )
    time.sleep(1.0)
    return res


# --------------------------------------------------------------------------
# reporting


def fmt_value(cell: str, v: float) -> str:
    if cell in BULK_CELLS or cell == "latency":
        return f"{v:.2f}"
    if cell == "idle":
        return f"{v:.1f}"
    if v >= 10000:
        return f"{v / 1000:.1f}k"
    if v >= 1000:
        return f"{v / 1000:.2f}k"
    return f"{v:.0f}"


def summarize(runs: list[dict]) -> dict | None:
    if not runs:
        return None
    vals = [r["value"] for r in runs]
    return {
        "median": statistics.median(vals),
        "min": min(vals),
        "max": max(vals),
        "n": len(vals),
        "errors": sum(r.get("errors", 0) for r in runs),
        "cpu_per_unit": _median_or_none([_cpu_per_unit(r) for r in runs]),
        "p99_ms_median": _median_or_none([r.get("p99_ms") for r in runs]),
        "p50_ms": [
            round(r["latency"]["p50"] * 1000, 2)
            for r in runs
            if r.get("latency", {}).get("p50") is not None
        ],
    }


def _cpu_per_unit(r: dict) -> float | None:
    """Proxy CPU per request (µs) for hey cells, per GB (s) for bulk."""
    cpu = r.get("proxy_cpu_s")
    if cpu is None:
        return None
    if "bytes" in r:
        return cpu / (r["bytes"] / 1e9) if r.get("bytes") else None
    return cpu / r["ok"] * 1e6 if r.get("ok") else None


def _median_or_none(vals: list) -> float | None:
    vals = [v for v in vals if v is not None]
    return statistics.median(vals) if vals else None


def latency_text(s: dict, direct: dict | None) -> str:
    """p50 / p99 medians; for a proxy, the milliseconds it adds to going direct."""
    p99 = s["p99_ms_median"]
    txt = f"{s['median']:.2f} / {'?' if p99 is None else f'{p99:.2f}'}"
    if s is not direct and direct is not None and p99 is not None:
        d99 = direct["p99_ms_median"] or 0.0
        txt += f" (+{s['median'] - direct['median']:.2f} / +{p99 - d99:.2f})"
    if s["errors"]:
        txt += f" **{s['errors']} err**"
    return txt


def cell_text(cell: str, s: dict | None, ref: dict | None, is_elbasy: bool) -> str:
    if s is None:
        return "—"
    txt = fmt_value(cell, s["median"])
    if s["n"] > 1:
        txt += f" [{fmt_value(cell, s['min'])}–{fmt_value(cell, s['max'])}]"
    if s["errors"]:
        txt += f" **{s['errors']} err**"
    if cell != "idle" and ref is not None and not is_elbasy and s["median"] > 0:
        txt += f" ×{ref['median'] / s['median']:.2f}"
    return txt


TARGET_LINES = [
    # (label, cell, reference peers (max of), required ratio, direction)
    (
        "CONNECT keep-alive ≥ 0.9× max(HAProxy relay, tinyproxy)",
        "connect",
        ["haproxy", "tinyproxy"],
        0.9,
        "ratio",
    ),
    ("tunnel bulk ≥ 1.0× HAProxy relay", "bulk", ["haproxy"], 1.0, "ratio"),
    ("tunnel bulk, plain origin ≥ 1.0× HAProxy relay", "bulk-plain", ["haproxy"], 1.0, "ratio"),
    ("new tunnels/s ≥ 1.0× HAProxy relay", "connect-new", ["haproxy"], 1.0, "ratio"),
    ("plain HTTP forward ≥ 1.5× squid", "plain", ["squid"], 1.5, "ratio"),
    ("≤ 2 KiB per idle tunnel", "idle", [], 2.0, "max"),
    ("TLS interception keep-alive ≥ 10× mitmproxy", "intercept", ["mitmproxy"], 10.0, "ratio"),
    ("TLS interception, new conn/req ≥ 5× mitmproxy", "intercept-new", ["mitmproxy"], 5.0, "ratio"),
    # the bench's own (not in docs/design.md §8): the C ceiling for the hop
    (
        "TLS interception keep-alive ≥ 1.0× nginx relay at ≤ 1.1× its CPU",
        "intercept",
        ["nginx-relay"],
        1.0,
        "ratio-cpu",
    ),
    (
        "TLS interception, new conn/req ≥ 1.0× nginx relay at ≤ 1.1× its CPU",
        "intercept-new",
        ["nginx-relay"],
        1.0,
        "ratio-cpu",
    ),
]
# "ratio-cpu" lines: elbasy's CPU per request at most this many times the reference's
CPU_RATIO_MAX = 1.1

# What a second worker buys: elbasy --workers 2 against one worker, in the same
# run (client, origin and proxy share this machine's cores), at no more CPU
# per request than one worker spends.
SCALING_LINES = [
    ("TLS interception keep-alive: 2 workers ≥ 1.5× 1 worker", "intercept", 1.5),
    ("TLS interception, new conn/req: 2 workers ≥ 1.5× 1 worker", "intercept-new", 1.5),
]
SCALING_CPU_MAX = 1.0


def _cpu_text(s: dict) -> str:
    v = s.get("cpu_per_unit")
    return "? µs/req" if v is None else f"{v:.0f} µs/req"


def target_rows(summary: dict) -> list[list[str]]:
    rows = []
    for label, cell, refs, need, kind in TARGET_LINES:
        if cell not in summary:
            continue  # cell not run
        el = summary.get(cell, {}).get("elbasy")
        if el is None:
            rows.append([label, "not measured", "", "", "", "n/a"])
            continue
        if kind == "ratio-cpu":
            rows.append(_ratio_cpu_row(label, cell, el, summary[cell].get(refs[0]), refs[0], need))
            continue
        if kind == "max":
            ok = el["median"] <= need
            result = "PASS" if ok else "MISS"
            if el["errors"]:
                result = "MISS (elbasy errors)"
            rows.append([label, f"{el['median']:.2f} KiB", "—", "—", f"≤ {need}", result])
            continue
        cands = [(r, summary.get(cell, {}).get(r)) for r in refs]
        cands = [(r, s) for r, s in cands if s is not None and s["median"] > 0]
        if not cands:
            rows.append(
                [
                    label,
                    fmt_value(cell, el["median"]),
                    "reference not measured",
                    "",
                    f"≥ {need}",
                    "n/a",
                ]
            )
            continue
        rname, rs = max(cands, key=lambda c: c[1]["median"])
        ratio = el["median"] / rs["median"]
        result = "PASS" if ratio >= need else "MISS"
        if el["errors"]:
            result = "MISS (elbasy errors)"
        rows.append(
            [
                label,
                fmt_value(cell, el["median"]),
                f"{rname} {fmt_value(cell, rs['median'])}",
                f"{ratio:.2f}",
                f"≥ {need}",
                result,
            ]
        )
    return rows


def scaling_rows(summary: dict) -> list[list[str]]:
    """elbasy-w2 against elbasy on the interception cells (see SCALING_LINES)."""
    rows = []
    for label, cell, need in SCALING_LINES:
        if cell not in summary:
            continue
        two, one = summary[cell].get("elbasy-w2"), summary[cell].get("elbasy")
        if two is None or one is None or one["median"] <= 0:
            rows.append([label, "not measured", "", "", "", "n/a"])
            continue
        ratio = two["median"] / one["median"]
        two_cpu, one_cpu = two.get("cpu_per_unit"), one.get("cpu_per_unit")
        cpu_ratio = two_cpu / one_cpu if two_cpu is not None and one_cpu else None
        ok = ratio >= need and cpu_ratio is not None and cpu_ratio <= SCALING_CPU_MAX
        result = "PASS" if ok else "MISS"
        if two["errors"]:
            result = "MISS (elbasy errors)"
        rows.append(
            [
                label,
                f"{fmt_value(cell, two['median'])}, {_cpu_text(two)}",
                f"1 worker {fmt_value(cell, one['median'])}, {_cpu_text(one)}",
                f"{ratio:.2f}, CPU {'?' if cpu_ratio is None else f'{cpu_ratio:.2f}'}",
                f"≥ {need}, CPU ≤ {SCALING_CPU_MAX}",
                result,
            ]
        )
    return rows


def _ratio_cpu_row(
    label: str, cell: str, el: dict, ref: dict | None, rname: str, need: float
) -> list[str]:
    """Throughput at least ``need`` × the reference's, and CPU per request at most
    CPU_RATIO_MAX × its: both medians from this run."""
    needed = f"≥ {need}, CPU ≤ {CPU_RATIO_MAX}"
    el_txt = f"{fmt_value(cell, el['median'])}, {_cpu_text(el)}"
    if ref is None or ref["median"] <= 0:
        return [label, el_txt, "reference not measured", "", needed, "n/a"]
    ratio = el["median"] / ref["median"]
    el_cpu, ref_cpu = el.get("cpu_per_unit"), ref.get("cpu_per_unit")
    cpu_ratio = el_cpu / ref_cpu if el_cpu is not None and ref_cpu else None
    ref_txt = f"{rname} {fmt_value(cell, ref['median'])}, {_cpu_text(ref)}"
    ratio_txt = f"{ratio:.2f}, CPU {'?' if cpu_ratio is None else f'{cpu_ratio:.2f}'}"
    if cpu_ratio is None:
        result = "n/a (CPU not measured)"
    else:
        result = "PASS" if ratio >= need and cpu_ratio <= CPU_RATIO_MAX else "MISS"
    if el["errors"]:
        result = "MISS (elbasy errors)"
    return [label, el_txt, ref_txt, ratio_txt, needed, result]


INTERCEPT_RATIOS = [
    ("elbasy", "nginx-relay"),
    ("elbasy", "mitmproxy"),
    ("elbasy", "proxy.py"),
    ("elbasy", "direct"),
    ("nginx-relay", "direct"),
    ("mitmproxy", "direct"),
    ("proxy.py", "direct"),
]
# CPU per request, the proxies' own (direct has none)
INTERCEPT_CPU_RATIOS = [("elbasy", "nginx-relay"), ("elbasy", "mitmproxy")]


def intercept_ratio_rows(summary: dict, cells: list[str]) -> list[list[str]]:
    rows = []
    for a, b in INTERCEPT_RATIOS:
        row = [f"{a} / {b}"]
        for cell in cells:
            sa, sb = summary[cell].get(a), summary[cell].get(b)
            ok = sa is not None and sb is not None and sb["median"] > 0
            row.append(f"{sa['median'] / sb['median']:.3g}" if ok else "—")
        rows.append(row)
    for a, b in INTERCEPT_CPU_RATIOS:
        row = [f"CPU per request, {a} / {b}"]
        for cell in cells:
            sa, sb = summary[cell].get(a), summary[cell].get(b)
            ca = sa.get("cpu_per_unit") if sa else None
            cb = sb.get("cpu_per_unit") if sb else None
            row.append(f"{ca / cb:.3g}" if ca is not None and cb else "—")
        rows.append(row)
    return rows


def md_table(header: list[str], rows: list[list[str]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(out)


def machine_info(peers: dict[str, Peer]) -> list[str]:
    cpu = "?"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        debian = Path("/etc/debian_version").read_text().strip()
    except OSError:
        debian = "?"
    mem = "?"
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemTotal"):
                mem = f"{int(line.split()[1]) / 1048576:.1f} GiB"
    except OSError:
        pass
    curl_version = " ".join(first_line(["curl", "--version"]).split()[:2])
    lines = [
        f"- CPUs {LOADAVG.get('busy', '?')} busy just before the run; load average at start "
        f"{LOADAVG.get('start', '?')}, at end {_loadavg()} "
        "(client, proxies and origin share the cores; anything else running skews "
        "absolute figures)",
        f"- machine: {os.cpu_count()} cores ({cpu}), {mem} RAM, Linux {platform.release()}, "
        f"Debian {debian}, "
        f"Python {platform.python_version()}",
        f"- load tools: hey {_dpkg_version('hey')}, {curl_version}, "
        f"{first_line(['openssl', 'version'])}",
        f"- origin: {first_line([which('nginx') or 'nginx', '-v'])} "
        f"(1 worker, TLS with a P-256 cert for {TLS_HOST}/{LOOPBACK} signed by a bench CA)",
    ]
    for peer in peers.values():
        for p in (peer, peer.intercept):
            if p is None or (p is peer and not p.procs and not p.failed and p.intercept):
                continue  # only its intercepting instance ran
            state = f"**out: {p.failed}**" if p.failed else p.notes
            lines.append(f"- {p.label}: {p.version or '?'} — {state}")
    return lines


LOADAVG: dict[str, str] = {}


def _loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


def cpu_busy(seconds: float) -> float:
    """Fraction of all CPUs busy (not idle, not iowait) over a short sample."""

    def sample() -> tuple[int, int]:
        with open("/proc/stat") as f:
            vals = [int(v) for v in f.readline().split()[1:]]
        idle = vals[3] + (vals[4] if len(vals) > 4 else 0)
        return sum(vals), idle

    try:
        t0, i0 = sample()
        time.sleep(seconds)
        t1, i1 = sample()
    except (OSError, ValueError, IndexError):
        return 0.0
    return 1 - (i1 - i0) / (t1 - t0) if t1 > t0 else 0.0


def _dpkg_version(pkg: str) -> str:
    try:
        p = run(["dpkg-query", "-W", "-f", "${Version}", pkg], timeout=20)
        return p.stdout.strip() or "?"
    except (OSError, subprocess.TimeoutExpired):
        return "?"


def settings_lines(args, cells: list[str]) -> list[str]:
    """How the cells that ran were measured, for the line above the table."""
    reps = f"{args.repeats} repeat(s)"
    if set(cells) & set(BULK_CELLS) and args.bulk_repeats != args.repeats:
        reps += f" ({args.bulk_repeats} for bulk)"
    out = [f"median [min–max] over {reps}, peers rotated each repeat;"]
    if set(cells) - {*BULK_CELLS, "idle", "latency"}:
        out.append(f"hey -c {args.concurrency} -z {args.duration:g}s;")
    if set(cells) & set(BULK_CELLS):
        out.append(f"bulk = {human_size(args.bulk_size)} via curl;")
    if "idle" in cells:
        tls = " (one TLS handshake through each)" if args.idle_tls else ""
        out.append(f"idle = RSS growth of the process tree / {args.idle_tunnels} tunnels{tls};")
    if "latency" in cells:
        out.append(
            f"latency = hey -c 1 -n {args.latency_requests} (keep-alive), medians of p50 / p99 "
            "in ms, (+ms added to direct);"
        )
    out.append("×R = elbasy median / that peer's median (>1: elbasy faster).")
    return out


def render(
    results: dict, peers: dict[str, Peer], cells: list[str], args, started: str
) -> tuple[str, dict]:
    summary = {
        cell: {
            t: summarize(results[cell].get(t, []))
            for t in CELL_TARGETS[cell]
            if results[cell].get(t)
        }
        for cell in cells
    }
    rows = []
    for name in ALL_TARGETS:
        if name not in peers:
            continue
        label = {
            "direct": "direct (no proxy)",
            "haproxy": "HAProxy TCP relay",
            "nginx-relay": "nginx TLS relay (no CONNECT)",
        }.get(name, name)
        if peers[name].failed:
            label += " (out)"
        row = [label]
        for cell in cells:
            if name not in CELL_TARGETS[cell]:
                row.append("n/a")
                continue
            s = summary[cell].get(name)
            target = peers[name].for_cell(cell)
            if s is None and target.failed:
                row.append("(out)")
            elif cell == "latency" and s is not None:
                row.append(latency_text(s, summary[cell].get("direct")))
            else:
                row.append(cell_text(cell, s, summary[cell].get("elbasy"), name == "elbasy"))
        rows.append(row)
    out = []
    out.append(f"## elbasy load benchmark, {started}")
    out.append("")
    out.append(" ".join(settings_lines(args, cells)))
    out.append("")
    out.append(md_table(["peer"] + [CELL_TITLES[c] for c in cells], rows))
    out.append("")
    out.append(
        "### Targets (docs/design.md §8, and the bench's own against the nginx relay; "
        "medians from this run)"
    )
    out.append("")
    out.append(
        md_table(
            ["target", "elbasy", "reference", "ratio", "needed", "result"], target_rows(summary)
        )
    )
    out.append("")
    scaling = scaling_rows(summary)
    if scaling:
        out.append("### Workers: elbasy --workers 2 against one worker (medians from this run)")
        out.append("")
        out.append(
            md_table(["target", "2 workers", "1 worker", "ratio", "needed", "result"], scaling)
        )
        out.append("")
    ratio_cells = [c for c in ("intercept", "intercept-new") if c in cells]
    if ratio_cells:
        out.append("### TLS interception ratios (medians from this run)")
        out.append("")
        out.append(
            md_table(
                ["ratio"] + [CELL_TITLES[c].split(" (")[0] for c in ratio_cells],
                intercept_ratio_rows(summary, ratio_cells),
            )
        )
        out.append("")
    hey_cells = [c for c in cells if c not in (*BULK_CELLS, "idle", "latency")]
    if hey_cells:
        out.append("### hey p50 latency per repeat (ms): a second mode shows up here")
        out.append("")
        lrows = []
        for name in ALL_TARGETS:
            if name not in peers:
                continue
            row = [name]
            for cell in hey_cells:
                s = summary[cell].get(name)
                row.append(", ".join(f"{v:g}" for v in s["p50_ms"]) if s else "—")
            lrows.append(row)
        out.append(md_table(["peer"] + [CELL_TITLES[c].split(" (")[0] for c in hey_cells], lrows))
        out.append("")
    cpu_cells = [c for c in cells if c != "idle"]
    if cpu_cells:
        out.append("### Proxy CPU per unit of work, median (µs per request; s per GB for bulk)")
        out.append("")
        out.append(
            "Less sensitive than req/s to whatever else runs on the machine; "
            "the sum of user and system time of the proxy's process tree during the cell."
        )
        out.append("")
        crows = []
        for name in ALL_TARGETS:
            if name not in peers or name == "direct":
                continue
            row = [name]
            for cell in cpu_cells:
                s = summary[cell].get(name)
                v = s["cpu_per_unit"] if s else None
                row.append("—" if v is None else (f"{v:.2f}" if cell in BULK_CELLS else f"{v:.0f}"))
            crows.append(row)
        out.append(md_table(["peer"] + [CELL_TITLES[c].split(" (")[0] for c in cpu_cells], crows))
        out.append("")
    errs = []
    for cell in cells:
        for name, runs in results[cell].items():
            for i, r in enumerate(runs):
                if r.get("errors"):
                    errs.append(
                        f"- {cell} / {name} / repeat {r.get('repeat', i)}: {r['errors']} errors; "
                        + "; ".join(r.get("error_samples", [])[:2])
                    )
    if errs:
        out.append("### Errors")
        out.append("")
        out += errs[:40]
        out.append("")
    out.append("### Machine and peers")
    out.append("")
    out += machine_info(peers)
    out.append("")
    out.append("### Command")
    out.append("")
    out.append(
        "    " + shlex.join(["python3", os.path.relpath(sys.argv[0], REPO_DIR)] + sys.argv[1:])
    )
    return "\n".join(out) + "\n", summary


# --------------------------------------------------------------------------
# main


def parse_args(argv: list[str] | None = None):
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--quick",
        action="store_true",
        help="smoke test: 1 repeat, 2s cells, 256MiB bulk, 500 idle tunnels (explicit flags win)",
    )
    ap.add_argument("--repeats", type=int, default=None, help="repeats per cell (default 5)")
    ap.add_argument(
        "--bulk-repeats",
        type=int,
        default=None,
        help="repeats of the bulk cells, a few seconds each (default 9)",
    )
    ap.add_argument(
        "--duration", type=parse_duration, default=None, help="hey -z per cell (default 5s)"
    )
    ap.add_argument("--concurrency", type=int, default=50, help="hey -c (default 50)")
    ap.add_argument(
        "--bulk-size", type=parse_size, default=None, help="bulk object size (default 1GiB)"
    )
    ap.add_argument(
        "--bulk-timeout", type=int, default=120, help="curl --max-time for bulk (default 120)"
    )
    ap.add_argument(
        "--idle-tunnels", type=int, default=None, help="idle tunnels per peer (default 5000)"
    )
    ap.add_argument(
        "--idle-timeout",
        type=float,
        default=180,
        help="seconds to open them, per peer (default 180)",
    )
    ap.add_argument(
        "--idle-tls",
        action="store_true",
        help="do a TLS handshake with the origin through each idle tunnel before idling",
    )
    ap.add_argument(
        "--only",
        "--cells",
        dest="only",
        default=",".join(CELLS),
        help=f"cells, comma-separated: {','.join(CELLS)}",
    )
    ap.add_argument(
        "--latency-requests",
        type=int,
        default=None,
        help="hey -n for the latency cell, one client (default 1000)",
    )
    ap.add_argument(
        "--latency-timeout",
        type=float,
        default=120,
        help="seconds before a latency run is cut off and counted as an error (default 120)",
    )
    ap.add_argument(
        "--peers",
        default=",".join(BASELINES + PROXIES),
        help=f"targets, comma-separated: {','.join(ALL_TARGETS)}",
    )
    ap.add_argument(
        "--json",
        dest="json_out",
        default=None,
        help="raw results file (default bench/results/<date>.json, table beside it as .md)",
    )
    ap.add_argument(
        "--skip-install", action="store_true", help="do not apt-get / pip install the peers"
    )
    ap.add_argument(
        "--elbasy-python",
        default=sys.executable,
        help="python that has elbasy installed (default: this one)",
    )
    ap.add_argument(
        "--warmup",
        type=parse_duration,
        default=1.0,
        help="uncounted hey run per peer and cell before the repeats (default 1s, 0 = none)",
    )
    ap.add_argument(
        "--pause", type=float, default=0.5, help="seconds of quiet between cells (default 0.5)"
    )
    args = ap.parse_args(argv)
    quick = {
        "repeats": 1,
        "bulk_repeats": 1,
        "duration": 2.0,
        "bulk_size": 256 << 20,
        "idle_tunnels": 500,
        "latency_requests": 200,
    }
    full = {
        "repeats": 5,
        "bulk_repeats": 9,
        "duration": 5.0,
        "bulk_size": 1 << 30,
        "idle_tunnels": 5000,
        "latency_requests": 1000,
    }
    for k, v in (quick if args.quick else full).items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    args.cells = [c.strip() for c in args.only.split(",") if c.strip()]
    args.targets = [t.strip() for t in args.peers.split(",") if t.strip()]
    for c in args.cells:
        if c not in CELLS:
            ap.error(f"unknown cell {c!r}; choose from {','.join(CELLS)}")
    for t in args.targets:
        if t not in ALL_TARGETS:
            ap.error(f"unknown peer {t!r}; choose from {','.join(ALL_TARGETS)}")
    if (
        min(
            args.repeats,
            args.bulk_repeats,
            args.idle_tunnels,
            args.concurrency,
            args.latency_requests,
        )
        < 1
    ):
        ap.error(
            "--repeats, --bulk-repeats, --idle-tunnels, --concurrency and --latency-requests "
            "must be positive"
        )
    args.cells = [c for c in CELLS if c in args.cells]
    args.targets = [t for t in ALL_TARGETS if t in args.targets]
    return args


def measure(args, workdir: Path, peers: dict[str, Peer], results: dict) -> None:
    """Start origins and peers, then run every cell; fills peers and results."""
    log(f"workdir {workdir}; origins (nginx, {human_size(args.bulk_size)} bulk object)")
    origins = start_origins(workdir, args.bulk_size)
    peers.update(start_peers(args.targets, workdir, origins, args))

    if "idle" in args.cells:
        names = [n for n in CELL_TARGETS["idle"] if n in peers]
        for name in names:
            peer = peers[name]
            if not peer.check_alive():
                continue
            log(f"idle: {args.idle_tunnels} tunnels through {name}")
            r = idle_cell(peer, origins, args)
            r["repeat"] = 0
            results["idle"].setdefault(name, []).append(r)
            log(
                f"idle: {name}: {r['value']:.2f} KiB/tunnel "
                f"({r['tunnels_held']}/{r['tunnels_requested']} held, "
                f"RSS {r['rss_before_kib']} -> {r['rss_after_kib']} KiB)"
            )
            peer.check_alive()

    load_cells = [c for c in args.cells if c != "idle"]
    if args.warmup > 0:
        log(f"warm-up: {args.warmup:g}s of hey per peer and cell (not counted)")
        warm = argparse.Namespace(**vars(args))
        warm.duration = args.warmup
        # the latency cell rides the keep-alive interception path: warm that
        warm_cells = {"intercept" if c == "latency" else c for c in load_cells} - set(BULK_CELLS)
        for cell in [c for c in CELLS if c in warm_cells]:
            for name in CELL_TARGETS[cell]:
                if name not in peers:
                    continue
                target = peers[name].for_cell(cell)
                if name == "direct" or target.check_alive():
                    hey_cell(cell, target, origins, warm)
    for rep in range(max(args.repeats, args.bulk_repeats)):
        for ci, cell in enumerate(load_cells):
            if rep >= (args.bulk_repeats if cell in BULK_CELLS else args.repeats):
                continue
            names = [n for n in CELL_TARGETS[cell] if n in peers]
            k = (rep + ci) % len(names) if names else 0
            order = names[k:] + names[:k]  # rotate: no peer always goes first
            for name in order:
                target = peers[name].for_cell(cell)
                if name != "direct" and not target.check_alive():
                    continue
                cpu0 = target.cpu_s()
                r = run_cell(cell, target, origins, args)
                r["repeat"] = rep
                if name != "direct":
                    r["proxy_cpu_s"] = round(target.cpu_s() - cpu0, 3)
                results[cell].setdefault(name, []).append(r)
                extra = f", {r['errors']} errors" if r.get("errors") else ""
                log(f"repeat {rep + 1} {cell:13s} {name:10s} {run_text(cell, r)}{extra}")
                if name != "direct":
                    target.check_alive()
                time.sleep(args.pause)


def run_cell(cell: str, target: Peer, origins: Origins, args) -> dict:
    if cell in BULK_CELLS:
        return bulk_cell(target, origins, args, tls=cell == "bulk")
    if cell == "latency":
        return latency_cell(target, origins, args)
    return hey_cell(cell, target, origins, args)


def run_text(cell: str, r: dict) -> str:
    if cell in BULK_CELLS:
        return f"{r['value']:10.2f} GB/s"
    if cell == "latency":
        p99 = r.get("p99_ms")
        return f"p50 {r['value']:.2f} ms, p99 {'?' if p99 is None else f'{p99:.2f}'} ms"
    return f"{r['value']:10.2f} req/s"


def report(
    args,
    peers: dict[str, Peer],
    results: dict,
    started: str,
    stamp: str,
    elapsed: float,
    interrupted: bool,
) -> None:
    if interrupted:
        started += " (interrupted: partial results)"
    table, summary = render(results, peers, args.cells, args, started)
    print(table, flush=True)
    log(f"done in {elapsed / 60:.1f} min")
    json_path = Path(args.json_out) if args.json_out else RESULTS_DIR / f"{stamp}.json"
    json_path.parent.mkdir(parents=True, exist_ok=True)
    raw = {
        "started": started,
        "argv": sys.argv,
        "elapsed_s": elapsed,
        "interrupted": interrupted,
        "settings": {
            k: getattr(args, k)
            for k in (
                "repeats",
                "bulk_repeats",
                "duration",
                "concurrency",
                "bulk_size",
                "idle_tunnels",
                "idle_tls",
                "latency_requests",
                "cells",
                "targets",
            )
        },
        "peers": {
            p.label: {"version": p.version, "failed": p.failed, "notes": p.notes}
            for peer in peers.values()
            for p in (peer, peer.intercept)
            if p is not None
        },
        "summary": summary,
        "results": results,
    }
    json_path.write_text(json.dumps(raw, indent=1, default=str))
    json_path.with_suffix(".md").write_text(table)
    log(f"raw results: {json_path}; table: {json_path.with_suffix('.md')}")


def _interrupt(signum: int, _frame: object) -> None:
    # Unwind through the finally below, which stops every process we started.
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = _dt.datetime.now().strftime("%Y-%m-%d %H:%M")
    stamp = _dt.datetime.now().strftime("%Y-%m-%d-%H%M%S")
    if os.geteuid() != 0 and not args.skip_install:
        log("not root: skipping installs (use --skip-install to silence this)")
        args.skip_install = True
    LOADAVG["start"] = _loadavg()
    busy = cpu_busy(1.0)
    LOADAVG["busy"] = f"{busy:.0%}"
    if busy > 0.2:
        loud(
            f"the CPUs were {busy:.0%} busy in the second before the run: something else is "
            "using the cores, absolute figures (and maybe ratios) will be off"
        )
    install(args.skip_install)
    if not which("hey") or not which("curl") or not which("nginx"):
        raise SystemExit("hey, curl and nginx are required (drop --skip-install to install them)")
    nofile = raise_nofile()
    if "idle" in args.cells and nofile < args.idle_tunnels + 100:
        log(f"RLIMIT_NOFILE hard limit is {nofile}: capping --idle-tunnels")
        args.idle_tunnels = max(1, nofile - 200)

    workdir = Path(tempfile.mkdtemp(prefix="elbasy-bench-"))
    os.chmod(workdir, 0o755)
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _interrupt)
    t0 = time.monotonic()
    results: dict = {cell: {} for cell in args.cells}
    peers: dict[str, Peer] = {}
    interrupted = False
    try:
        try:
            measure(args, workdir, peers, results)
        except KeyboardInterrupt:
            interrupted = True
            log("interrupted: reporting what was measured so far")
        if peers:
            report(args, peers, results, started, stamp, time.monotonic() - t0, interrupted)
    finally:
        stop_all()
        shutil.rmtree(workdir, ignore_errors=True)
    return 130 if interrupted else 0


if __name__ == "__main__":
    sys.exit(main())
