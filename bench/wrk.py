"""The load driver: run wrk against a loopback URL and parse what it prints.

:func:`parse` is pure (text in, :class:`WrkResult` out) so it is tested
without wrk; :func:`run` is the thin shell that starts wrk with a hard
deadline.  A failed request is a non-2xx/3xx response or a socket error
(connect, read, write or timeout), exactly as wrk counts them.
"""
from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import asdict, dataclass
from typing import Optional
from urllib.parse import urlsplit

_UNITS = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
_DURATION = re.compile(r"^([0-9.]+)(us|ms|s|m|h)$")
_PERCENTILE = re.compile(r"^\s*(50|75|90|99)(?:\.0+)?%\s+(\S+)\s*$", re.M)
_TOTAL = re.compile(r"^\s*(\d+) requests in ([0-9.]+)(us|ms|s|m|h),", re.M)
_SOCKET = re.compile(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)")
_NON2XX = re.compile(r"Non-2xx or 3xx responses: (\d+)")
_RPS = re.compile(r"^Requests/sec:\s+([0-9.]+)", re.M)

LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")


class WrkError(RuntimeError):
    """wrk did not run or printed something this parser does not understand."""


@dataclass(frozen=True)
class WrkResult:
    """One wrk run.  Latencies in seconds."""
    requests: int
    duration: float
    rps: float
    p50: float
    p90: float
    p99: float
    non_2xx: int
    connect_errors: int
    read_errors: int
    write_errors: int
    timeouts: int

    @property
    def socket_errors(self) -> int:
        return self.connect_errors + self.read_errors + self.write_errors + self.timeouts

    @property
    def failed(self) -> int:
        return self.non_2xx + self.socket_errors

    def as_dict(self) -> dict:
        d = asdict(self)
        d.update(socket_errors=self.socket_errors, failed=self.failed)
        return d


def seconds(text: str) -> float:
    """wrk's duration text ("812.00us", "1.20ms", "2.00s") in seconds."""
    m = _DURATION.match(text.strip())
    if not m:
        raise WrkError("not a wrk duration: %r" % text)
    return float(m.group(1)) * _UNITS[m.group(2)]


def parse(text: str) -> WrkResult:
    """Parse the output of ``wrk --latency``."""
    total = _TOTAL.search(text)
    rps = _RPS.search(text)
    if not total or not rps:
        raise WrkError("wrk output without a request count: %r" % text[-400:])
    pct = {int(p): seconds(v) for p, v in _PERCENTILE.findall(text)}
    if 50 not in pct or 99 not in pct:
        raise WrkError("wrk output without a latency distribution (missing --latency?)")
    sock = _SOCKET.search(text)
    connect, read, write, timeout = (int(x) for x in sock.groups()) if sock else (0, 0, 0, 0)
    non2xx = _NON2XX.search(text)
    return WrkResult(
        requests=int(total.group(1)),
        duration=float(total.group(2)) * _UNITS[total.group(3)],
        rps=float(rps.group(1)),
        p50=pct[50], p90=pct.get(90, pct[99]), p99=pct[99],
        non_2xx=int(non2xx.group(1)) if non2xx else 0,
        connect_errors=connect, read_errors=read, write_errors=write, timeouts=timeout)


def command(url: str, duration: float, connections: int = 8, threads: int = 2,
            timeout: float = 10.0) -> list[str]:
    """The wrk command line; refuses any target that is not loopback."""
    host = urlsplit(url).hostname
    if host not in LOOPBACK_HOSTS:
        raise ValueError("the benchmark only loads loopback addresses, not %r" % host)
    return ["wrk", "-t%d" % threads, "-c%d" % max(connections, threads),
            "-d%ds" % max(1, round(duration)), "--timeout", "%ds" % max(1, round(timeout)),
            "--latency", url]


def available() -> Optional[str]:
    return shutil.which("wrk")


def start(url: str, duration: float, connections: int = 8, threads: int = 2) -> subprocess.Popen:
    """Start wrk in the background (for scenarios that act while it runs)."""
    return subprocess.Popen(command(url, duration, connections, threads),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(proc: subprocess.Popen, duration: float) -> WrkResult:
    """Wait for a wrk started by :func:`start` (bounded) and parse its output."""
    try:
        out, _ = proc.communicate(timeout=duration + 30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise WrkError("wrk did not finish within %.0fs" % (duration + 30)) from None
    if proc.returncode != 0:
        raise WrkError("wrk exited %s: %s" % (proc.returncode, out[-400:]))
    return parse(out)


def run(url: str, duration: float, connections: int = 8, threads: int = 2) -> WrkResult:
    """Run wrk for ``duration`` seconds and return its parsed result."""
    return finish(start(url, duration, connections, threads), duration)
