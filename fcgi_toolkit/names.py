"""Names and shared facts: one home for each.

Every module that names a slot, counts capacity, prints a size or a
duration, keys a worker life or waits for a recycle asks this module, so
``status``, the metrics, the supervisorctl plugin, the operator commands and
the watchdog never hold two truths.  Pure: supervisor's state codes only.
"""
from __future__ import annotations

from typing import Any, Optional

from supervisor.states import ProcessStates

# --------------------------------------------------------------------------
# Slot names
# --------------------------------------------------------------------------

#: A slot's process name: the group's name and the slot index, "wiki_00".
SLOT_NAME = "%s_%02d"
#: The same name in supervisord's own expansion (``process_name`` and the log
#: file of the rendered [fcgi-program]); tests/test_names.py checks they agree.
SUPERVISOR_SLOT_NAME = "%(program_name)s_%(process_num)02d"


def slot_name(group: str, index: int) -> str:
    """The process name of slot ``index`` of ``group``: ``slot_name("wiki", 1) == "wiki_01"``."""
    return SLOT_NAME % (group, index)


def slot_names(group: str, slots: int) -> list[str]:
    """Every slot's process name, slot 0 first."""
    return [slot_name(group, i) for i in range(slots)]


def nginx_program(group: str) -> str:
    """The managed nginx's supervisord program name: ``nginx_program("wiki") == "wiki_nginx"``."""
    return "%s_nginx" % group


def supervisord_program(name: str, number: int) -> str:
    """The front's program running the inner supervisord of generation ``number``:
    ``supervisord_program("wiki", 3) == "wiki_s3"``."""
    return "%s_s%d" % (name, number)


def supervisord_file(filename: str, number: int) -> str:
    """A supervisord's file name: the front's (``number`` 0) as given, an
    inner one's with its generation: ``supervisord_file("supervisord.conf", 3)
    == "supervisord-g3.conf"``."""
    if not number:
        return filename
    stem, dot, ext = filename.rpartition(".")
    return "%s-g%d%s%s" % (stem, number, dot, ext)


def watchdog_program(name: str) -> str:
    """The watchdog listener's supervisord name: ``watchdog_program("wiki") == "wiki_watchdog"``."""
    return "%s_watchdog" % name


# --------------------------------------------------------------------------
# Capacity: which supervisord states count
# --------------------------------------------------------------------------

#: States in which a slot holds one of the ``workers.count`` places: serving,
#: about to serve, or being retried by supervisord (BACKOFF).  A BACKOFF slot
#: counts: supervisord starts it again by itself, so the watchdog must not
#: start another slot in its place, and ``status`` must not call a stopped
#: slot a hole while it does.  The watchdog and ``status`` both use this.
CAPACITY_STATES = (ProcessStates.STARTING, ProcessStates.RUNNING, ProcessStates.BACKOFF)
#: States in which a slot may be started (a standby slot).
STARTABLE_STATES = (ProcessStates.STOPPED, ProcessStates.EXITED, ProcessStates.FATAL)
#: States of a replacement that did not come up.
FAILED_STATES = (ProcessStates.BACKOFF, ProcessStates.FATAL, ProcessStates.EXITED)
#: States in which a slot has a process (and so a pid worth showing).
PROCESS_STATES = (ProcessStates.STARTING, ProcessStates.RUNNING, ProcessStates.STOPPING)

_STATE_NAMES = {code: name for name, code in vars(ProcessStates).items()
                if not name.startswith("_")}


def state_name(code: int) -> str:
    """supervisord's name of a process state code ("RUNNING"); the number if unknown."""
    return _STATE_NAMES.get(code, str(code))


# --------------------------------------------------------------------------
# Worker lives
# --------------------------------------------------------------------------

def life_key(pid: int, created: float) -> tuple[int, float]:
    """The key of one worker life: its pid and its start time to 10 ms.

    A pid alone is reused by the OS; (pid, start time) is not.  The start
    time is psutil's ``create_time()`` (the worker publishes the same value
    in its scoreboard slot); 10 ms absorbs the float's round trip through
    JSON and the scoreboard.
    """
    return (int(pid), round(float(created), 2))


def same_life(pid_a: int, created_a: Optional[float], pid_b: int,
              created_b: Optional[float]) -> bool:
    """Whether two (pid, start time) pairs name the same worker life."""
    if created_a is None or created_b is None:
        return False
    return life_key(pid_a, created_a) == life_key(pid_b, created_b)


# --------------------------------------------------------------------------
# Formatting
# --------------------------------------------------------------------------

KB = 1024
MB = 1024 * KB
GB = 1024 * MB


def format_size(n: Optional[int]) -> str:
    """Bytes as supervisor writes sizes (1024-based): "512KB", "301MB", "80.5MB", "2.5GB".

    One decimal below 100MB when whole MB would hide a difference (a reason
    "rss 80.5MB > 80MB" must not read "80MB > 80MB"); "-" for None.
    """
    if n is None:
        return "-"
    if n < MB:
        return "%dKB" % (n // KB)
    if n < GB:
        mb = n / MB
        return "%dMB" % mb if mb == int(mb) or mb >= 100 else "%.1fMB" % mb
    gb = n / GB
    return "%dGB" % gb if gb == int(gb) else "%.1fGB" % gb


def format_duration(seconds: Optional[float]) -> str:
    """Seconds as the deployment file writes durations: "45s", "3m", "3m05s",
    "6h", "6h02m", "2d", "2d04h" (a zero last part is left out); "-" for None."""
    if seconds is None:
        return "-"
    s = int(seconds)
    if s < 60:
        return "%ds" % s
    for unit, size, small, small_size in (("d", 86400, "h", 3600), ("h", 3600, "m", 60),
                                          ("m", 60, "s", 1)):
        if s >= size:
            big, rest = divmod(s, size)
            part = rest // small_size
            return "%d%s%02d%s" % (big, unit, part, small) if part else "%d%s" % (big, unit)
    raise AssertionError(s)  # unreachable: s >= 60


# --------------------------------------------------------------------------
# How long a recycle may take
# --------------------------------------------------------------------------

#: Seconds an operator command waits beyond the recycles themselves.
REQUEST_SLACK = 30.0


def recycle_time(dep: Any) -> float:
    """The longest one replacement takes: start and become ready
    (recycle.ready_timeout), drain its predecessor (workers.graceful_timeout
    plus supervisord's kill margin) and two watchdog passes to notice each."""
    return (dep.recycle.ready_timeout + dep.workers.graceful_timeout + 5
            + 2 * dep.recycle.check_interval)


def request_wait(dep: Any, op: str) -> float:
    """How long ``fcgi-toolkit recycle/reload`` and ``fcgi recycle/reload`` wait
    for the watchdog's answer: one replacement, times the worker count for a
    reload, plus slack."""
    return recycle_time(dep) * (dep.workers.count if op == "reload" else 1) + REQUEST_SLACK


#: The signal (supervisord's name) that tells a warm standby to accept; the
#: worker's handler only sets a flag (:mod:`fcgi_toolkit.worker`).
PROMOTE_SIGNAL = "USR2"
