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
                                   "began": EPOCH, "start_issued": EPOCH, "log_offset": 0}},
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
from typing import Any, Optional

log = logging.getLogger(__name__)

VERSION = 1
REQUEST_SUFFIX = ".json"
RESULT_SUFFIX = ".result.json"


def write_json_atomic(path: str, data: Any) -> None:
    """Write ``data`` as JSON to ``path`` via a temporary file and a rename."""
    tmp = "%s.tmp.%d" % (path, os.getpid())
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=1, sort_keys=True)
        f.write("\n")
    os.replace(tmp, path)


def read_json(path: str) -> Optional[Any]:
    """The JSON in ``path``, or None if it is missing or unreadable."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        log.warning("ignoring unreadable %s: %s", path, exc)
        return None


# --------------------------------------------------------------------------
# State
# --------------------------------------------------------------------------

def empty_state() -> dict:
    return {"version": VERSION, "slots": {}, "recycle": None, "reload": None, "flap_level": 0}


def new_slot_state() -> dict:
    return {"recycles": 0, "last_reason": "", "last_time": 0.0, "by_reason": {},
            "flapping": False, "backoff_until": 0.0, "fails": 0, "life": None}


def load_state(path: str) -> dict:
    """The state in ``path``; an empty state if it is missing, unreadable or of another version."""
    data = read_json(path)
    if not isinstance(data, dict) or data.get("version") != VERSION:
        if data is not None:
            log.warning("state file %s has an unknown layout; starting afresh", path)
        return empty_state()
    state = empty_state()
    state.update(data)
    if not isinstance(state.get("slots"), dict):
        state["slots"] = {}
    for name, slot in list(state["slots"].items()):
        merged = new_slot_state()
        if isinstance(slot, dict):
            merged.update(slot)
        state["slots"][name] = merged
    return state


def save_state(path: str, state: dict) -> None:
    write_json_atomic(path, state)


def slot_state(state: dict, name: str) -> dict:
    """The record of slot ``name`` in ``state``, created on first use."""
    return state["slots"].setdefault(name, new_slot_state())


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
            _remove(os.path.join(directory, fname))
            continue
        data = read_json(os.path.join(directory, fname))
        out.append((request_id, data if isinstance(data, dict) else None))
    return out


def answer(runtime_dir: str, request_id: str, ok: bool, message: str) -> None:
    """Write the result of a request, then remove the request."""
    directory = requests_dir(runtime_dir)
    write_json_atomic(os.path.join(directory, request_id + RESULT_SUFFIX),
                      {"ok": bool(ok), "message": message})
    _remove(os.path.join(directory, request_id + REQUEST_SUFFIX))


def result(runtime_dir: str, request_id: str) -> Optional[dict]:
    """The result of a request, or None while it is unanswered."""
    return read_json(os.path.join(requests_dir(runtime_dir), request_id + RESULT_SUFFIX))


def forget(runtime_dir: str, request_id: str) -> None:
    """Remove a request and its result (the CLI, after reading the result or giving up)."""
    directory = requests_dir(runtime_dir)
    for suffix in (REQUEST_SUFFIX, RESULT_SUFFIX):
        _remove(os.path.join(directory, request_id + suffix))


def _remove(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass
