"""The generation switch's pure decisions: its steps (:func:`plan`) and
what undoes a failed one (:func:`undo`), its phases, whether the new
generation started (:func:`check_start`), whether slots stopped
(:func:`all_stopped`), whether reloadConfig added the new group
(:func:`added_group`), whether a new inner supervisord is up
(:func:`check_supervisord`).  The shell that carries the switch out is
:mod:`fcgi_toolkit.switch`.

Which supervisord holds a generation's workers is a number (``holder``):
0 the front (``run``'s own, which always keeps nginx), N the inner
supervisord generation N started as a program of the front.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any, Mapping, Optional, Sequence

from supervisor.states import ProcessStates

from fcgi_toolkit import names
from fcgi_toolkit.names import STARTABLE_STATES, format_duration, state_name


class Phase(enum.Enum):
    """What ``status`` shows while a switch is under way (the switch state file)."""
    STARTING = "starting"          # the new group is added, its workers start
    NGINX = "switching nginx"
    DRAINING = "draining"          # the new one serves; the old one stops, one at a time
    ROLLING_BACK = "rolling back"


class Step(enum.Enum):
    """One step of a switch, in the order :func:`plan` gives them."""
    START_SUPERVISORD = "start the new inner supervisord"   # a program of the front
    START_WORKERS = "start the new workers"                 # ready within ready_timeout
    SWITCH_NGINX = "switch nginx"                           # re-rendered, graceful reload
    RECORD = "record the serving generation"                # generation.json
    FOLLOW = "the watchdog follows"                         # the same watchdog re-reads
    STOP_OLD_WATCHDOG = "stop the old watchdog"             # one watchdog owns the state
    START_NEW_WATCHDOG = "start the new watchdog"           # the inner one's
    DRAIN = "drain the old workers"                         # one at a time, group removed
    STOP_OLD_SUPERVISORD = "stop the old inner supervisord"  # it drains its own workers


class Undo(enum.Enum):
    """One step of a rollback (the old generation never stopped)."""
    RESTORE_NGINX = "nginx files back"
    STOP_NEW_WORKERS = "stop and remove the new group"
    STOP_NEW_SUPERVISORD = "stop and remove the new inner supervisord"
    RESTORE_CONF = "supervisord configuration back, reloadConfig"


def plan(old_holder: int, new_holder: int) -> tuple[Step, ...]:
    """The steps from the generation held by ``old_holder`` to one held by
    ``new_holder``: the same supervisord (a group generation) or a new inner
    one (a supervisord generation: from the front or from an inner one)."""
    if new_holder == old_holder:
        return (Step.START_WORKERS, Step.SWITCH_NGINX, Step.RECORD, Step.FOLLOW, Step.DRAIN)
    if new_holder <= old_holder:
        raise ValueError("a new supervisord has a new generation number: %d after %d"
                         % (new_holder, old_holder))
    return (Step.START_SUPERVISORD, Step.START_WORKERS, Step.SWITCH_NGINX, Step.RECORD,
            Step.STOP_OLD_WATCHDOG, Step.START_NEW_WATCHDOG,
            Step.STOP_OLD_SUPERVISORD if old_holder else Step.DRAIN)


#: The steps after which the new generation serves (a failure then is no rollback).
SERVING = (Step.RECORD, Step.FOLLOW, Step.STOP_OLD_WATCHDOG, Step.START_NEW_WATCHDOG,
           Step.DRAIN, Step.STOP_OLD_SUPERVISORD)


def undo(steps: Sequence[Step], failed: Step) -> tuple[Undo, ...]:
    """What undoes a switch of ``steps`` that failed in ``failed`` (a step
    before the new generation serves): nginx back if it was touched, the new
    workers (or the new inner supervisord, which drains them) stopped and
    removed, the configuration restored."""
    if failed in SERVING:
        raise ValueError("%s: the new generation serves already" % failed.value)
    out = [Undo.RESTORE_NGINX] if failed is Step.SWITCH_NGINX else []
    out.append(Undo.STOP_NEW_SUPERVISORD if Step.START_SUPERVISORD in steps
               else Undo.STOP_NEW_WORKERS)
    return tuple(out) + (Undo.RESTORE_CONF,)


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


def check_supervisord(program: Mapping[str, Any], state: Optional[Mapping[str, Any]],
                      elapsed: float, timeout: float) -> Verdict:
    """Whether a new inner supervisord is up: its program in the front
    RUNNING (it outlived startsecs) and its own control socket answering
    getState RUNNING (``state``: None while it does not answer); a program
    that exited (a bad configuration, a port it cannot bind) or a start
    longer than ``timeout`` fails."""
    if program["state"] in names.FAILED_STATES:
        return Verdict(failed="%s did not start (%s)" % (program["name"],
                                                         state_name(program["state"])))
    if (program["state"] == ProcessStates.RUNNING and state is not None
            and state.get("statename") == "RUNNING"):
        return Verdict(ready=True)
    if elapsed >= timeout:
        return Verdict(failed="%s not up within recycle.ready_timeout (%s)"
                       % (program["name"], format_duration(timeout)))
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
