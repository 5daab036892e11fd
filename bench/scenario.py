"""What every scenario shares: the run context, the result shape, sampling.

A scenario module provides ``NAME``, ``TITLE`` and ``run(ctx) -> Result``.
A result is a table: one row per contender, a ``ratio`` column against the
baseline contender measured in the same run, plus ``series`` for the plots
and ``skipped`` naming every contender that could not run and why.
"""
from __future__ import annotations

import logging
import statistics
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from bench.contenders import Spec, unavailable
from bench.stack import Session

log = logging.getLogger("bench")


@dataclass
class Context:
    """Settings of one bench run."""
    session: Session
    smoke: bool = False
    duration: float = 5.0        # seconds of load per measurement
    rounds: int = 3              # interleaved repetitions (A B C A B C ...)
    workers: int = 2
    connections: int = 8
    kinds: tuple = ("ours", "flup", "uwsgi", "gunicorn")
    # Values other scenarios measured in this run (e.g. per-request time).
    shared: dict = field(default_factory=dict)

    def can_run(self, kind: str, spec: Spec) -> Optional[str]:
        if kind not in self.kinds:
            return "not selected (--contenders)"
        return unavailable(kind, spec)

    def started(self, plan: list, result: "Result", access_log: bool = False):
        """Start each ``(label, kind, spec)`` of ``plan`` in turn and yield
        ``(label, kind, stack)``; the stack is stopped when the caller moves on.
        A contender that cannot run or does not start is recorded as skipped."""
        for label, kind, spec in plan:
            why = self.can_run(kind, spec)
            if why:
                result.skipped[label] = why
                continue
            try:
                stack = self.session.start(kind, spec, label=label, access_log=access_log)
            except Exception as exc:
                log.exception("%s did not start", label)
                result.skipped[label] = "did not start: %s" % exc
                continue
            try:
                yield label, kind, stack
            finally:
                self.session.stop(stack)


@dataclass
class Result:
    name: str
    title: str
    baseline: str
    columns: list               # [(key, header, format)] for the Markdown table
    rows: list = field(default_factory=list)
    skipped: dict = field(default_factory=dict)
    notes: list = field(default_factory=list)
    series: dict = field(default_factory=dict)
    seconds: float = 0.0

    def as_dict(self) -> dict:
        return {"name": self.name, "title": self.title, "baseline": self.baseline,
                "columns": [list(c) for c in self.columns], "rows": self.rows,
                "skipped": self.skipped, "notes": self.notes, "series": self.series,
                "seconds": round(self.seconds, 1)}


def ratio(value: Optional[float], base: Optional[float]) -> Optional[float]:
    """value / base, None when either is missing or base is 0."""
    if value is None or not base:
        return None
    return round(value / base, 3)


def add_ratios(rows: list, baseline: str, key: str, out: str = "ratio") -> None:
    """Set ``row[out] = row[key] / baseline_row[key]`` on every row."""
    base = next((r.get(key) for r in rows if r["contender"] == baseline), None)
    for r in rows:
        r[out] = ratio(r.get(key), base)


def median(values: list) -> Optional[float]:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def http_get(url: str, timeout: float = 10.0) -> tuple[int, bytes]:
    """One GET to a loopback URL: (status, body); status 0 on a connection error."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, b""
    except OSError:
        return 0, b""


class Sampler:
    """Calls ``fn()`` every ``interval`` seconds in a thread; keeps (t, value) pairs."""

    def __init__(self, fn: Callable[[], Any], interval: float):
        self.fn = fn
        self.interval = interval
        self.samples: list = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.samples.append((time.time(), self.fn()))
            except Exception:  # a sample that fails is a gap, not the end of the run
                log.debug("sample failed", exc_info=True)
            self._stop.wait(self.interval)

    def __enter__(self) -> "Sampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(10)


def rss_of(pids: list) -> dict:
    """{pid: rss bytes} of the pids still alive."""
    import psutil
    out = {}
    for pid in pids:
        try:
            out[pid] = psutil.Process(pid).memory_info().rss
        except psutil.Error:
            pass
    return out


def distinct_pids(samples: list) -> set:
    """Every pid seen in samples of ``worker_pids()``."""
    seen: set = set()
    for _, pids in samples:
        seen.update(pids)
    return seen
