"""The generation switch's pure decisions: its phases, whether the new
generation started (:func:`check_start`), whether slots stopped
(:func:`all_stopped`), whether reloadConfig added the new group
(:func:`added_group`).  The shell that carries the switch out is
:mod:`fcgi_toolkit.switch`.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from supervisor.states import ProcessStates

from fcgi_toolkit import names
from fcgi_toolkit.names import STARTABLE_STATES, format_duration, state_name


class Phase(enum.Enum):
    """What ``status`` shows while a switch is under way (the switch state file)."""
    STARTING = "starting"          # the new group is added, its workers start
    NGINX = "switching nginx"
    DRAINING = "draining"          # the new one serves; the old one stops, one at a time
    ROLLING_BACK = "rolling back"


class SwitchFailed(Exception):
    """The new generation did not take over; the message is one line."""


class DrainFailed(Exception):
    """The new generation serves, but the old one did not drain (one line)."""


# --------------------------------------------------------------------------
# Pure decisions
# --------------------------------------------------------------------------

@dataclass(frozen=True)
class Verdict:
    """The new generation's start: ready, failed (why), or neither yet."""
    ready: bool = False
    failed: str = ""


def check_start(slots: Sequence[str], infos: Mapping[str, Mapping[str, Any]],
                ready_pids: Mapping[str, int], elapsed: float, timeout: float) -> Verdict:
    """Whether every started slot is RUNNING (it outlived startsecs) and says
    ready in its scoreboard slot; a slot that exited (BACKOFF, EXITED,
    FATAL: a failed start) or a start longer than ``timeout`` fails."""
    for slot in slots:
        info = infos.get(slot)
        if info is None:
            return Verdict(failed="%s is not in supervisord" % slot)
        if info["state"] in names.FAILED_STATES:
            return Verdict(failed="%s did not start (%s)" % (slot, state_name(info["state"])))
    if all(infos[s]["state"] == ProcessStates.RUNNING and infos[s]["pid"]
           and ready_pids.get(s) == infos[s]["pid"] for s in slots):
        return Verdict(ready=True)
    if elapsed >= timeout:
        return Verdict(failed="not ready within recycle.ready_timeout (%s)"
                       % format_duration(timeout))
    return Verdict()


def all_stopped(slots: Sequence[str], infos: Mapping[str, Mapping[str, Any]]) -> bool:
    """Whether none of ``slots`` has a process (a missing slot has none)."""
    return all(slot not in infos or infos[slot]["state"] in STARTABLE_STATES for slot in slots)


def added_group(result: Any, group: str) -> str:
    """Why reloadConfig's ``[[added, changed, removed]]`` does not add ``group`` ("" if it does)."""
    try:
        added = list(result[0][0])
    except (TypeError, IndexError):
        return "reloadConfig answered %r" % (result,)
    return "" if group in added else "reloadConfig did not add %s (added: %s)" % (
        group, ", ".join(added) or "none")
