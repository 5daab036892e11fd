"""The watchdog's state file and the operator request queue.

State file (``Deployment.state_path``, JSON, replaced atomically)::

    {"version": 1,
     "slots": {"wiki_00": {"recycles": 3, "last_reason": "rss 301MB > 256MB",
                           "last_time": 1700000000.0, "by_reason": {"rss": 2, "requests": 1},
                           "flapping": false, "backoff_until": 0,
                           # extensions (readers may ignore them):
                           "fails": 0,          # consecutive failed starts of this slot
                           "life": {"pid": 123, "created": 1700000000.0,
                                    "max_requests": 1021, "max_age": 21700.0}}},
     "recycle": null | {OFFENDER: {"offender": "wiki_00", "replacement": "wiki_02",
                                   "phase": "starting" | "stopping" | "stopping_first" | "restarting",
                                   "old_pid": 123, "new_pid": 0, "reason": "...", "kind": "rss",
                                   "origin": "watchdog" | "operator" | "reload",
                                   "request": null | ID, "flapping": false,
                                   "began": EPOCH, "start_issued": EPOCH,
                                   "took": null | SECONDS,
                                   "warm": false}},     # the replacement is a promoted warm standby
     "reload": null | {"request": null | ID, "origin": "operator" | "watch",
                       "old_pids": {"wiki_00": 123, ...}, "began": EPOCH, "replaced": 0},
     "flap_level": 0}

Operator requests: ``{runtime_dir}/requests/<id>.json`` holds
``{"op": "recycle", "worker": "wiki_01"}`` or ``{"op": "reload"}``; the
listener answers with ``<id>.result.json`` = ``{"ok": bool, "message": str}``
and then removes the request.  Every file is written to a temporary name and
renamed, so a reader never sees half a file.
"""
from __future__ import annotations

import json
import logging
import os
import time
import uuid
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Mapping, Optional, Sequence, Union

from fcgi_toolkit.names import life_key
from fcgi_toolkit.policy import backoff_delay
from fcgi_toolkit.recycle import Operation, Reload

log = logging.getLogger(__name__)

VERSION = 1
REQUEST_SUFFIX = ".json"
RESULT_SUFFIX = ".result.json"


def write_json_atomic(path: str, data: Any) -> None:
    """Write ``data`` as JSON to ``path`` via a temporary file and a rename."""
    write_bytes_atomic(path, (json.dumps(data, indent=1, sort_keys=True) + "\n").encode("utf-8"))


def write_bytes_atomic(path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temporary file and a rename."""
    tmp = "%s.tmp.%d" % (path, os.getpid())
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def read_json(path: str, quiet: bool = False) -> Optional[Any]:
    """The JSON in ``path``, or None if it is missing or unreadable (logged unless ``quiet``)."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        if not quiet:
            log.warning("ignoring unreadable %s: %s", path, exc)
        return None


# --------------------------------------------------------------------------
# State
# --------------------------------------------------------------------------

@dataclass(frozen=True)
class Life:
    """The limits drawn for one worker life (jitter included), kept across listener restarts."""
    pid: int
    created: float
    max_requests: int
    max_age: float

    @property
    def key(self) -> tuple[int, float]:
        return life_key(self.pid, self.created)


@dataclass(frozen=True)
class SlotHistory:
    """What the watchdog remembers about one slot (the state file's "slots" record)."""
    recycles: int = 0
    last_reason: str = ""
    last_time: float = 0.0
    by_reason: Mapping[str, int] = field(default_factory=dict)
    flapping: bool = False
    backoff_until: float = 0.0
    fails: int = 0                   # consecutive failed starts of this slot
    life: Optional[Life] = None

    def counted(self, kind: str, reason: str, now: float) -> "SlotHistory":
        """This history with one more recycle of ``kind``."""
        by_reason = dict(self.by_reason)
        by_reason[kind] = by_reason.get(kind, 0) + 1
        return replace(self, recycles=self.recycles + 1, last_reason=reason, last_time=now,
                       by_reason=by_reason)

    def to_json(self) -> dict:
        data = asdict(self)
        data["by_reason"] = dict(self.by_reason)
        return data

    @classmethod
    def from_json(cls, data: Any) -> "SlotHistory":
        """A slot record; a malformed one (or a malformed field) reads as fresh."""
        if not isinstance(data, dict):
            return cls()
        fresh, values = cls(), {}
        for key, convert in (("recycles", int), ("last_reason", str), ("last_time", float),
                             ("flapping", bool), ("backoff_until", float), ("fails", int)):
            try:
                values[key] = convert(data.get(key, getattr(fresh, key)))
            except (TypeError, ValueError):
                pass
        by_reason = data.get("by_reason")
        if isinstance(by_reason, dict):
            values["by_reason"] = {str(k): int(v) for k, v in by_reason.items()
                                   if isinstance(v, int)}
        life = data.get("life")
        if isinstance(life, dict) and life.get("pid"):
            try:
                values["life"] = Life(int(life["pid"]), float(life["created"]),
                                      int(life["max_requests"]), float(life["max_age"]))
            except (KeyError, TypeError, ValueError):
                pass
        return cls(**values)


@dataclass
class State:
    """The whole state file, typed: the coordinator's one working copy.

    Mutable on purpose (one owner, saved after every change); its parts
    (:class:`SlotHistory`, :class:`~fcgi_toolkit.recycle.Operation`,
    :class:`~fcgi_toolkit.recycle.Reload`) are frozen values replaced whole.
    """
    slots: dict[str, SlotHistory] = field(default_factory=dict)
    recycle: dict[str, Operation] = field(default_factory=dict)     # offender -> operation
    reload: Optional[Reload] = None
    flap_level: int = 0

    def slot(self, name: str) -> SlotHistory:
        return self.slots.get(name) or SlotHistory()

    def update_slot(self, name: str, **changes: Any) -> SlotHistory:
        self.slots[name] = replace(self.slot(name), **changes)
        return self.slots[name]

    def backoff(self, name: str, now: float) -> SlotHistory:
        """One more failed start of slot ``name``: it backs off exponentially."""
        fails = self.slot(name).fails + 1
        return self.update_slot(name, fails=fails, backoff_until=now + backoff_delay(fails))

    def count(self, name: str, kind: str, reason: str, now: float) -> None:
        """One more recycle of slot ``name``'s worker."""
        self.slots[name] = self.slot(name).counted(kind, reason, now)

    def flap(self, names: Sequence[str], now: float) -> float:
        """A flapping recycle: every one in a row backs ``names`` off longer; returns until when."""
        self.flap_level += 1
        until = now + backoff_delay(self.flap_level)
        for name in names:
            self.update_slot(name, backoff_until=until)
        return until

    def move_slots(self, old: Sequence[str], new: Sequence[str]) -> None:
        """A new generation serves: each slot's recycle counts move to the
        new slot of the same index (the operator's view goes on); the old
        group's recycles and reload are the old watchdog's, and end."""
        for before, after in zip(old, new):
            h = self.slot(before)
            self.update_slot(after, recycles=h.recycles, last_reason=h.last_reason,
                             last_time=h.last_time, by_reason=dict(h.by_reason))
            self.slots.pop(before, None)
        self.recycle.clear()
        self.reload = None

    def fresh_start(self) -> None:
        """Forget every backoff and flap (new code may cure what caused them)."""
        self.flap_level = 0
        for name in self.slots:
            self.update_slot(name, backoff_until=0.0, fails=0)

    def busy(self) -> frozenset:
        """Slots in a recycle: offenders and replacements."""
        return frozenset(name for op in self.recycle.values()
                         for name in (op.offender, op.replacement) if name)

    def to_json(self) -> dict:
        return {"version": VERSION,
                "slots": {n: h.to_json() for n, h in sorted(self.slots.items())},
                "recycle": {o: op.to_json() for o, op in sorted(self.recycle.items())} or None,
                "reload": self.reload.to_json() if self.reload else None,
                "flap_level": self.flap_level}

    @classmethod
    def from_json(cls, data: Mapping[str, Any], where: str = "state") -> "State":
        state = cls(flap_level=int(data.get("flap_level") or 0))
        slots = data.get("slots")
        for name, record in (slots.items() if isinstance(slots, dict) else ()):
            state.slots[str(name)] = SlotHistory.from_json(record)
        recycle = data.get("recycle")
        for offender, record in (recycle.items() if isinstance(recycle, dict) else ()):
            try:
                state.recycle[str(offender)] = Operation.from_json(record)
            except (KeyError, TypeError, ValueError) as exc:
                log.warning("%s: dropping unreadable recycle of %s: %r (%s)", where, offender,
                            record, exc)
        if isinstance(data.get("reload"), dict):
            try:
                state.reload = Reload.from_json(data["reload"])
            except (KeyError, TypeError, ValueError) as exc:
                log.warning("%s: dropping unreadable reload %r (%s)", where, data["reload"], exc)
        return state


def read_state(path: str) -> dict:
    """The state file as plain JSON data; {} if it is missing, unreadable or of
    another version (the watchdog has not written it yet).  For readers that
    show it as it is (``status``); the watchdog uses :func:`load_state`."""
    data = read_json(path, quiet=True)
    if not isinstance(data, dict) or data.get("version") != VERSION:
        return {}
    return data


def load_state(path: str) -> State:
    """The state in ``path``; an empty state if it is missing, unreadable or of another version."""
    data = read_json(path)
    if not isinstance(data, dict) or data.get("version") != VERSION:
        if data is not None:
            log.warning("state file %s has an unknown layout; starting afresh", path)
        return State()
    return State.from_json(data, path)


def save_state(path: str, state: Union[State, dict]) -> None:
    write_json_atomic(path, state.to_json() if isinstance(state, State) else state)


# --------------------------------------------------------------------------
# Operator requests
# --------------------------------------------------------------------------

def requests_dir(runtime_dir: str) -> str:
    return os.path.join(runtime_dir, "requests")


def enqueue(runtime_dir: str, request: dict) -> str:
    """Write a request for the listener; returns its id (sortable by time)."""
    directory = requests_dir(runtime_dir)
    os.makedirs(directory, exist_ok=True)
    request_id = "%d-%s" % (time.time_ns(), uuid.uuid4().hex[:8])
    write_json_atomic(os.path.join(directory, request_id + REQUEST_SUFFIX), request)
    return request_id


def pending(runtime_dir: str) -> list[tuple[str, Optional[dict]]]:
    """Unanswered requests, oldest first: (id, request or None if unreadable)."""
    directory = requests_dir(runtime_dir)
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return []
    out = []
    for fname in sorted(names):
        if not fname.endswith(REQUEST_SUFFIX) or fname.endswith(RESULT_SUFFIX) or ".tmp." in fname:
            continue
        request_id = fname[:-len(REQUEST_SUFFIX)]
        if os.path.exists(os.path.join(directory, request_id + RESULT_SUFFIX)):
            # Answered before a listener restart; the request file was left behind.
            remove(os.path.join(directory, fname))
            continue
        data = read_json(os.path.join(directory, fname))
        out.append((request_id, data if isinstance(data, dict) else None))
    return out


def answer(runtime_dir: str, request_id: str, ok: bool, message: str) -> None:
    """Write the result of a request, then remove the request."""
    directory = requests_dir(runtime_dir)
    write_json_atomic(os.path.join(directory, request_id + RESULT_SUFFIX),
                      {"ok": bool(ok), "message": message})
    remove(os.path.join(directory, request_id + REQUEST_SUFFIX))


def result(runtime_dir: str, request_id: str) -> Optional[dict]:
    """The result of a request, or None while it is unanswered."""
    return read_json(os.path.join(requests_dir(runtime_dir), request_id + RESULT_SUFFIX))


def forget(runtime_dir: str, request_id: str) -> None:
    """Remove a request and its result (the CLI, after reading the result or giving up)."""
    directory = requests_dir(runtime_dir)
    for suffix in (REQUEST_SUFFIX, RESULT_SUFFIX):
        remove(os.path.join(directory, request_id + suffix))


def remove(path: str) -> None:
    """Remove ``path``; one that is already gone is fine."""
    try:
        os.remove(path)
    except FileNotFoundError:
        pass
