"""Gather a :class:`~fcgi_toolkit.policy.Snapshot` of every slot of the group.

One pass asks supervisord for every process (one ``getAllProcessInfo``),
reads every scoreboard slot and asks psutil for each worker's RSS.  A
``psutil.Process`` is kept per worker life, keyed by (pid, create time), so
a reused pid is never mistaken for the old worker.  The per-life limits
(``max_requests`` plus jitter, ``max_age`` plus up to 10%) are drawn once per
life from an injected ``random.Random``.

``status`` and the metrics exporter reuse :func:`snapshot`.
"""
from __future__ import annotations

import logging
import random
import time
from typing import Any, Callable, Optional

import psutil

from fcgi_toolkit.names import life_key
from fcgi_toolkit.policy import Limits, SlotSnapshot, Snapshot
from fcgi_toolkit.scoreboard import Scoreboard, is_live

log = logging.getLogger(__name__)

__all__ = ["Sampler", "SlotSnapshot", "Snapshot", "snapshot"]

AGE_JITTER = 0.10


class Sampler:
    """Builds snapshots; remembers per-life psutil handles and drawn limits.

    ``lives`` maps (pid, create_time) to (max_requests, max_age) for this
    worker life; the coordinator persists it so a restarted listener keeps
    the same limits.
    """

    def __init__(self, group: str, slot_names: list[str], scoreboard: Any, limits: Limits,
                 rng: Optional[random.Random] = None, clock: Callable[[], float] = time.time,
                 process_factory: Callable[[int], Any] = psutil.Process):
        self.group = group
        self.slot_names = list(slot_names)
        self.scoreboard = scoreboard
        self.limits = limits
        self.rng = rng or random.Random()
        self.clock = clock
        self.process_factory = process_factory
        self.lives: dict[tuple[int, float], tuple[int, float]] = {}
        self._procs: dict[int, Any] = {}

    def follow(self, group: str, slot_names: list[str], scoreboard: Any) -> None:
        """Sample another group (the serving generation's) from now on."""
        if self.scoreboard is not None:
            self.scoreboard.close()
        self.group, self.slot_names, self.scoreboard = group, list(slot_names), scoreboard

    # -- per-life helpers --------------------------------------------------
    def _process(self, pid: int) -> tuple[Optional[Any], Optional[float]]:
        proc = self._procs.get(pid)
        if proc is not None:
            try:
                if proc.is_running():      # compares create_time: catches pid reuse
                    return proc, proc.create_time()
            except psutil.Error:
                pass
            del self._procs[pid]
        try:
            proc = self.process_factory(pid)
            created = proc.create_time()
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            return None, None
        self._procs[pid] = proc
        return proc, created

    def life_limits(self, pid: int, created: float) -> tuple[int, float]:
        key = life_key(pid, created)
        if key not in self.lives:
            lim = self.limits
            max_requests = (lim.max_requests + self.rng.randint(0, lim.max_requests_jitter)
                            if lim.max_requests else 0)
            max_age = lim.max_age * (1 + AGE_JITTER * self.rng.random()) if lim.max_age else 0.0
            self.lives[key] = (max_requests, max_age)
        return self.lives[key]

    def forget_dead(self, alive: set[int]) -> None:
        for pid in [p for p in self._procs if p not in alive]:
            del self._procs[pid]
        for key in [k for k in self.lives if k[0] not in alive]:
            del self.lives[key]

    # -- the snapshot ------------------------------------------------------
    def sample(self, infos: list[dict]) -> Snapshot:
        """A snapshot from ``getAllProcessInfo()``'s result (other groups ignored)."""
        now = self.clock()
        by_name = {i["name"]: i for i in infos if i.get("group") == self.group}
        slots = []
        alive: set[int] = set()
        for index, name in enumerate(self.slot_names):
            info = by_name.get(name)
            if info is None:
                continue
            pid = int(info.get("pid") or 0)
            state = int(info["state"])
            rss, rss_time, created, record, age = 0, 0.0, None, None, 0.0
            max_requests, max_age = 0, 0.0
            if pid:
                proc, created = self._process(pid)
                if proc is not None and created is not None:
                    alive.add(pid)
                    try:
                        rss, rss_time = proc.memory_info().rss, now
                    except psutil.Error:
                        rss, rss_time = 0, 0.0
                    age = max(0.0, now - created)
                    max_requests, max_age = self.life_limits(pid, created)
                    rec = self.scoreboard.read(index) if self.scoreboard else None
                    if rec is not None and is_live(rec, pid, created):
                        record = rec
            slots.append(SlotSnapshot(
                name=name, index=index, state=state, pid=pid, create_time=created, rss=rss,
                record=record, age=age, max_requests=max_requests, max_age=max_age,
                description=str(info.get("description", "")), rss_time=rss_time))
        self.forget_dead(alive)
        return Snapshot(time=now, slots=tuple(slots))


def snapshot(dep: Any, rpc: Any, rng: Optional[random.Random] = None) -> Snapshot:
    """One snapshot of ``dep``'s group through a supervisord RPC proxy.

    For readers (``status``, metrics): the per-life limits are freshly drawn
    here; the watchdog's drawn values are in the state file (slot "life").
    """
    board = Scoreboard(dep.scoreboard_path, dep.slots)
    try:
        sampler = Sampler(dep.group, dep.slot_names(), board, Limits.from_deployment(dep), rng)
        return sampler.sample(rpc.supervisor.getAllProcessInfo())
    finally:
        board.close()
