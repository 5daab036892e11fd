"""What asks the coordinator for a recycle or a reload, besides the limits.

:class:`FileWatch` turns changes of ``recycle.watch`` files into one reload
after ``recycle.debounce`` of quiet; :func:`resolve_slot` and
:func:`read_request` turn an operator's request file into a slot and an op.
Both are small and keep no knowledge of how a recycle runs: the coordinator
calls its one ``begin(...)`` for them all.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

from supervisor.options import split_namespec
from supervisor.states import ProcessStates

from fcgi_toolkit import policy, statefile
from fcgi_toolkit.names import format_duration
from fcgi_toolkit.policy import Snapshot, Wait
from fcgi_toolkit.settings import ConfigError

log = logging.getLogger("fcgi_toolkit.watchdog")


class FileWatch:
    """Debounced change detection of files by (mtime, size); ``stat`` is injected."""

    def __init__(self, paths: Sequence[str], debounce: float,
                 stat: Callable[[str], os.stat_result] = os.stat):
        self.paths = list(paths)
        self.debounce = debounce
        self.stat = stat
        self._signature: Optional[dict] = None
        self.changed_at: Optional[float] = None     # last change not acted on yet
        self.changed: set[str] = set()              # files changed since the last firing

    @property
    def pending(self) -> bool:
        return self.changed_at is not None

    def _read(self) -> dict:
        sig = {}
        for path in self.paths:
            try:
                st = self.stat(path)
                sig[path] = (st.st_mtime_ns, st.st_size)
            except OSError:
                sig[path] = None
        return sig

    def due(self, now: float, may_fire: bool = True) -> bool:
        """Look at the files; True once, after ``debounce`` of quiet since a change,
        when ``may_fire`` (no reload running: the change waits for it to end)."""
        if not self.paths:
            return False
        sig = self._read()
        if self._signature is None:
            self._signature = sig
            return False
        if sig != self._signature:
            changed = [p for p in sig if sig[p] != self._signature.get(p)]
            if self.changed_at is None:
                log.info("watched file changed: %s; reloading after %s of quiet",
                         ", ".join(changed), format_duration(self.debounce))
            self._signature = sig
            self.changed_at = now
            self.changed.update(changed)
        if self.changed_at is not None and now - self.changed_at >= self.debounce and may_fire:
            self.changed_at = None
            return True
        return False

    def take_changed(self) -> set[str]:
        """The files changed since the last firing (and forget them)."""
        changed, self.changed = self.changed, set()
        return changed


def resolve_slot(worker: str, group: str, slot_names: Sequence[str]) -> Optional[str]:
    """A slot name from "wiki_01", "wiki:wiki_01", "01" or "1"; None if unknown."""
    grp, name = split_namespec(str(worker))
    if grp != name and grp != group:
        return None
    if name in slot_names:
        return name
    if name.isdigit() and int(name) < len(slot_names):
        return slot_names[int(name)]
    return None


@dataclass(frozen=True)
class Request:
    """One operator request: ``op`` is "recycle" (of ``worker``), "reload" or
    "apply" (re-read the deployment file; ``rolling``: then replace every worker)."""
    id: str
    op: str
    worker: str = ""
    rolling: bool = False


def read_request(request_id: str, data: Optional[dict[str, Any]]) -> tuple[Optional[Request], str]:
    """A request file's content as a :class:`Request`, or (None, why it is refused)."""
    op = data.get("op") if data else None
    if op == "recycle":
        return Request(request_id, op, str(data.get("worker", ""))), ""
    if op == "reload":
        return Request(request_id, op), ""
    if op == "apply":
        return Request(request_id, op, rolling=bool(data.get("rolling"))), ""
    return None, "unknown request %r" % (data,)


#: Seconds between two looks for a new operator request between passes.
REQUEST_POLL = 0.2


class RequestWatch:
    """Whether the request directory changed since the last look (one stat):
    a new ``recycle``/``reload``/``apply`` request is served by the next pass
    at once instead of after up to ``recycle.check_interval``."""

    def __init__(self, runtime_dir: str, stat: Callable[[str], Any] = os.stat):
        self.directory = statefile.requests_dir(runtime_dir)
        self.stat = stat
        self.seen = self._look()

    def _look(self) -> Optional[tuple]:
        try:
            st = self.stat(self.directory)
        except OSError:
            return None     # no request was ever made (enqueue creates the directory)
        return (st.st_ino, st.st_mtime_ns)

    def arrived(self) -> bool:
        now = self._look()
        changed = now is not None and now != self.seen
        self.seen = now
        return changed


class OperatorRequests:
    """Answers the request files of ``fcgi-toolkit recycle/reload``; a request
    the capacity guard cannot admit yet waits (it is asked again next pass)."""

    def __init__(self, coordinator: Any):
        self.co = coordinator

    def serve(self, snap: Snapshot, now: float) -> None:
        taken = {op.request for op in self.co.state.recycle.values()}
        if self.co.state.reload:
            taken.add(self.co.state.reload.request)
        for request_id, data in statefile.pending(self.co.runtime_dir):
            if request_id in taken:
                continue
            request, refusal = read_request(request_id, data)
            if request is None:
                statefile.answer(self.co.runtime_dir, request_id, False, refusal)
            elif request.op == "recycle":
                self._recycle(snap, now, request_id, request.worker)
            elif request.op == "apply":
                if not self.co.state.reload:    # else it waits for the reload to end
                    self._apply(snap, now, request)
            elif self.co.state.reload:
                statefile.answer(self.co.runtime_dir, request_id, False,
                                 "a rolling reload is already in progress")
            else:
                self.co.reloads.begin(snap, now, "operator", request_id)

    def _apply(self, snap: Snapshot, now: float, request: Request) -> None:
        """Re-read the deployment file; with ``rolling``, replace every worker."""
        try:
            message = self.co.reread()
        except ConfigError as exc:
            return statefile.answer(self.co.runtime_dir, request.id, False, str(exc))
        if not request.rolling:
            return statefile.answer(self.co.runtime_dir, request.id, True, message)
        self.co.reloads.begin(snap, now, "apply", request.id)

    def _recycle(self, snap: Snapshot, now: float, request_id: str, worker: str) -> None:
        name = resolve_slot(worker, self.co.gateway.group, self.co.slot_names)
        slot = snap.get(name) if name else None
        refusal = ""
        if slot is None:
            refusal = "unknown worker %r (slots: %s)" % (worker, ", ".join(self.co.slot_names))
        elif name in self.co.state.busy():
            refusal = "%s is already being replaced" % name
        elif slot.state != ProcessStates.RUNNING:
            refusal = "%s is not running (%s)" % (name, slot.statename)
        elif slot.warm:
            refusal = "%s is a warm standby (it serves nothing); `reload` replaces it" % name
        if refusal:
            return statefile.answer(self.co.runtime_dir, request_id, False, refusal)
        decision = policy.admit(snap, now, self.co.limits, self.co.memory(), name,
                                "operator request", "operator")
        if isinstance(decision, Wait):
            if request_id not in self.co.recall.waiting_logged:
                self.co.recall.waiting_logged.add(request_id)
                log.info("operator recycle of %s waits: %s", name, decision.why)
            return
        self.co.begin(decision, snap, now, "operator", request_id)
