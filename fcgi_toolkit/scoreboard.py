"""The scoreboard: one fixed-size slot per worker in a shared memory-mapped file.

A worker writes only its own slot; the watchdog, ``status`` and the metrics
read every slot.  Updates are plain stores into a shared mapping, so the
request path makes no system call for them, and a reader in another process
sees them at once.  Each slot is guarded by a sequence counter (a seqlock):
the writer makes it odd while it writes, and a reader retries until it reads
the same even value before and after, so a reader never sees half an update.

A slot carries the writer's pid and its process start time as psutil reports
it (``psutil.Process().create_time()``); a reader compares both with the
live process, so a slot left behind by a killed worker is told apart from a
live one even when its pid is reused.

When asked to (``rss_every > 0``, the deployment has ``limits.max_rss``), the
writer also publishes its own resident set size, measured when a request
ends but at most once per ``rss_every`` seconds: one ``os.pread`` of a
``/proc/self/statm`` descriptor kept open for the life of the writer, times
the page size.  The watchdog polls these values between its full passes, so
a worker over its memory limit is noticed within a fraction of a second
instead of at the next psutil sample.

The writer also publishes a *baseline*: its RSS when it became ready, then
again right after its first :data:`BASELINE_REQUESTS` requests (an app that
fills caches on its first requests is judged by that).  The watchdog calls a
worker flapping only if its baseline is over the limit, that is when a fresh
replacement would be over it too (:mod:`fcgi_toolkit.policy`).
"""
from __future__ import annotations

import mmap
import os
import struct
import threading
import time
from dataclasses import dataclass
from typing import Callable, Optional

from fcgi_toolkit.names import same_life

# seq, pid, started, requests, inflight, flags, req_start, req_id,
# last_duration, rss, rss_time, baseline, method, uri
_FORMAT = struct.Struct("<QqdQIIdQdQdQ16s152s")
SLOT_SIZE = 256
assert _FORMAT.size <= SLOT_SIZE

READY = 1
DRAINING = 2
STANDBY = 4

METHOD_MAX = 16
URI_MAX = 152

#: Publish the worker's RSS at most this often (seconds), when asked to.
RSS_EVERY = 0.05
#: The baseline RSS is measured again after this many requests.
BASELINE_REQUESTS = 3
_STATM = "/proc/self/statm"
_PAGE_SIZE = mmap.PAGESIZE


@dataclass(frozen=True)
class SlotRecord:
    """What one slot says about its worker."""
    slot: int
    pid: int
    started: float          # process create time (epoch seconds, psutil's value)
    requests: int           # requests completed in this worker life
    inflight: int           # requests being served now
    ready: bool             # the app is imported and the worker accepts
    draining: bool          # a stop signal arrived; no new connections
    req_start: float        # epoch start of the oldest in-flight request, 0 if none
    req_id: int             # sequence number of that request in this life
    last_duration: float    # seconds the last completed request took
    method: str
    uri: str
    rss: int = 0            # resident bytes the worker last published (0: never)
    rss_time: float = 0.0   # epoch when it measured them
    baseline: int = 0       # resident bytes near its start (see BASELINE_REQUESTS; 0: unknown)
    standby: bool = False   # a warm standby: the app is imported, it waits (not accepting)

    def request_age(self, now: float) -> float:
        """Seconds the oldest in-flight request has been running (0 if none)."""
        return max(0.0, now - self.req_start) if self.inflight and self.req_start else 0.0


def _size(slots: int) -> int:
    return slots * SLOT_SIZE


def _open_map(path: str, slots: int, writable: bool) -> Optional[mmap.mmap]:
    flags = os.O_RDWR | os.O_CREAT if writable else os.O_RDONLY
    try:
        fd = os.open(path, flags, 0o640)
    except FileNotFoundError:
        return None
    try:
        need = _size(slots)
        if writable and os.fstat(fd).st_size < need:
            # Every writer grows the file to the same size: idempotent, race-free.
            os.ftruncate(fd, need)
        if os.fstat(fd).st_size < need:
            return None
        access = mmap.ACCESS_WRITE if writable else mmap.ACCESS_READ
        return mmap.mmap(fd, need, access=access)
    finally:
        os.close(fd)


def create(path: str, slots: int) -> None:
    """Create the scoreboard file (or grow it) so that it holds ``slots`` slots."""
    m = _open_map(path, slots, writable=True)
    if m is not None:
        m.close()


def read_statm_rss(fd: int) -> int:
    """Resident bytes from an open ``/proc/<pid>/statm`` descriptor (one pread)."""
    fields = os.pread(fd, 128, 0).split()
    return int(fields[1]) * _PAGE_SIZE


class SlotWriter:
    """The worker's handle on its own slot.  Thread-safe within one process.

    ``rss_every`` > 0 turns on RSS publishing (see the module docstring);
    ``monotonic`` paces it (injected in tests).
    """

    def __init__(self, path: str, slot: int, slots: int, pid: int, started: float,
                 clock: Callable[[], float] = time.time, rss_every: float = 0.0,
                 monotonic: Callable[[], float] = time.monotonic):
        if not 0 <= slot < slots:
            raise ValueError("slot %d outside 0..%d" % (slot, slots - 1))
        mm = _open_map(path, slots, writable=True)
        assert mm is not None
        self._mm = mm
        self._offset = slot * SLOT_SIZE
        self._clock = clock
        self._lock = threading.Lock()
        # Continue the slot's sequence so a reader never sees it go back.
        self._seq = _FORMAT.unpack_from(mm, self._offset)[0]
        self._seq += self._seq % 2
        self._pid = pid
        self._started = started
        self._requests = 0
        self._flags = 0
        self._last_duration = 0.0
        self._next_id = 0
        # In-flight requests by id: (start, method bytes, uri bytes).  The slot
        # shows the oldest one, which is the one a watchdog cares about.
        self._inflight: dict[int, tuple[float, bytes, bytes]] = {}
        self._rss, self._rss_time, self._baseline = 0, 0.0, 0
        self._rss_every = rss_every
        self._monotonic = monotonic
        self._next_rss = 0.0
        self._statm: Optional[int] = None
        if rss_every > 0:
            try:
                self._statm = os.open(_STATM, os.O_RDONLY | os.O_CLOEXEC)
            except OSError:
                # No procfs: nothing is published and the watchdog's own
                # sampling (psutil) still applies the limit.
                self._statm = None
        self._publish()

    def _publish(self) -> None:
        # Caller holds the lock (or is the constructor).
        if self._inflight:
            req_id = min(self._inflight)
            req_start, method, uri = self._inflight[req_id]
        else:
            req_id, req_start, method, uri = 0, 0.0, b"", b""
        mm, off = self._mm, self._offset
        self._seq += 1
        struct.pack_into("<Q", mm, off, self._seq)
        _FORMAT.pack_into(mm, off, self._seq, self._pid, self._started, self._requests,
                          len(self._inflight), self._flags, req_start, req_id,
                          self._last_duration, self._rss, self._rss_time, self._baseline,
                          method[:METHOD_MAX], uri[:URI_MAX])
        self._seq += 1
        struct.pack_into("<Q", mm, off, self._seq)

    def _measure_rss(self, now: float, force: bool = False) -> Optional[tuple[int, float]]:
        """A fresh (rss, when) if publishing is on and it is time, else None.

        Called without the lock.  time.monotonic() is a vDSO call, so the
        common case (not yet time) makes no system call at all.
        """
        if self._statm is None:
            return None
        tick = self._monotonic()
        if not force and tick < self._next_rss:
            return None
        self._next_rss = tick + self._rss_every
        try:
            return read_statm_rss(self._statm), now
        except (OSError, ValueError, IndexError):
            return None

    def set_ready(self, ready: bool = True) -> None:
        """The worker accepts (``ready``) or not; either way it is no standby any more."""
        self._set_flags(READY if ready else 0, baseline=ready)

    def set_standby(self) -> None:
        """The app is imported; the worker waits as a warm standby (not accepting)."""
        self._set_flags(STANDBY, baseline=True)

    def _set_flags(self, flags: int, baseline: bool) -> None:
        sample = self._measure_rss(self._clock(), force=True)
        with self._lock:
            if sample:
                self._rss, self._rss_time = sample
                if baseline:
                    self._baseline = self._rss
            self._flags = (self._flags & ~(READY | STANDBY)) | flags
            self._publish()

    def set_draining(self) -> None:
        with self._lock:
            self._flags |= DRAINING
            self._publish()

    def begin(self, method: str, uri: str) -> int:
        """Record a request's start; returns a token for :meth:`end`."""
        now = self._clock()
        with self._lock:
            self._next_id += 1
            token = self._next_id
            self._inflight[token] = (now, method.encode("latin-1", "replace"),
                                     uri.encode("latin-1", "replace"))
            self._publish()
        return token

    def end(self, token: int) -> None:
        now = self._clock()
        baseline_due = self._requests + 1 == BASELINE_REQUESTS
        sample = self._measure_rss(now, force=baseline_due)
        with self._lock:
            if sample:
                self._rss, self._rss_time = sample
                if baseline_due:
                    self._baseline = self._rss
            start = self._inflight.pop(token)[0]
            self._requests += 1
            self._last_duration = now - start
            self._publish()

    def clear(self) -> None:
        """Mark the slot free (a worker exiting normally)."""
        with self._lock:
            self._pid, self._started, self._flags = 0, 0.0, 0
            self._requests, self._inflight = 0, {}
            self._rss, self._rss_time, self._baseline = 0, 0.0, 0
            self._publish()

    def close(self) -> None:
        if self._statm is not None:
            os.close(self._statm)
            self._statm = None
        self._mm.close()


class Scoreboard:
    """A reader of every slot."""

    def __init__(self, path: str, slots: int):
        self.path = path
        self.slots = slots
        self._mm: Optional[mmap.mmap] = None

    def _map(self) -> Optional[mmap.mmap]:
        if self._mm is None:
            self._mm = _open_map(self.path, self.slots, writable=False)
        return self._mm

    def read(self, slot: int) -> Optional[SlotRecord]:
        """The slot's record, or None if the slot is free or the file is missing."""
        mm = self._map()
        if mm is None:
            return None
        off = slot * SLOT_SIZE
        for _ in range(1000):
            fields = _FORMAT.unpack_from(mm, off)
            seq = fields[0]
            if seq % 2 == 0 and struct.unpack_from("<Q", mm, off)[0] == seq:
                break
            time.sleep(0)
        else:  # pragma: no cover - a writer died mid-update: use what is there
            pass
        (_, pid, started, requests, inflight, flags, req_start, req_id,
         last_duration, rss, rss_time, baseline, method, uri) = fields
        if pid == 0:
            return None
        return SlotRecord(slot=slot, pid=pid, started=started, requests=requests,
                          inflight=inflight, ready=bool(flags & READY),
                          draining=bool(flags & DRAINING), req_start=req_start,
                          req_id=req_id, last_duration=last_duration,
                          method=method.rstrip(b"\0").decode("latin-1"),
                          uri=uri.rstrip(b"\0").decode("latin-1"), rss=rss, rss_time=rss_time,
                          baseline=baseline, standby=bool(flags & STANDBY))

    def read_all(self) -> list[Optional[SlotRecord]]:
        return [self.read(i) for i in range(self.slots)]

    def close(self) -> None:
        if self._mm is not None:
            self._mm.close()
            self._mm = None


def is_live(record: SlotRecord, pid: int, create_time: Optional[float]) -> bool:
    """Whether ``record`` was written by the process ``pid`` started at ``create_time``.

    ``create_time`` is psutil's value for that pid now (None if no such process).
    """
    return same_life(record.pid, record.started, pid, create_time)
