"""``status``'s output: the human tables and the documented JSON objects.

Sizes and durations are printed by :mod:`fcgi_toolkit.names`, as in the
watchdog's reasons and log lines.
"""
from __future__ import annotations

from typing import Mapping

from fcgi_toolkit.names import format_duration, format_size
from fcgi_toolkit.status_hosts import DeploymentStatus
from fcgi_toolkit.status_local import GroupStatus, worker_json


def summary_line(status: GroupStatus) -> str:
    standby = sum(1 for w in status.workers if w.state in ("standby", "warm"))
    warm = sum(1 for w in status.workers if w.state == "warm")
    parts = ["%s: %d/%d workers ready" % (status.group, status.ready, status.count),
             "%d standby" % standby + (" (%d warm)" % warm if warm else ""),
             "%d recycle%s" % (status.recycles, "" if status.recycles == 1 else "s")]
    last = max((w for w in status.workers if w.last_recycle_time),
               key=lambda w: w.last_recycle_time or 0.0, default=None)
    if last is not None:
        parts[-1] += " (last %s ago: %s %s)" % (
            format_duration(status.generated_at - (last.last_recycle_time or 0.0)),
            last.name, last.last_reason or "")
    line = ", ".join(parts)
    if status.generation > 1:
        line += "; generation %d" % status.generation
    if status.supervisord and status.supervisord.get("program"):
        line += " in supervisord %s (supervisorctl -c %s)" % (
            status.supervisord["program"], status.supervisord["conf"])
    if status.switch:
        line += "; generation switch in progress (%s -> %s: %s)" % (
            status.switch.get("old"), status.switch.get("new"), status.switch.get("phase"))
    if status.reload:
        line += "; reload in progress"
    elif status.recycle:
        # The state file keeps one entry per offender being replaced.
        moves = ["%s -> %s" % (offender, entry.get("replacement") or "?")
                 if isinstance(entry, Mapping) else offender
                 for offender, entry in sorted(status.recycle.items())]
        line += "; recycle in progress (%s)" % ", ".join(moves)
    if status.drift:
        line += "; the file differs from the running deployment (fcgi-toolkit apply): %s" % (
            ", ".join(status.drift))
    return line


_COLUMNS = ("WORKER", "STATE", "PID", "RSS", "REQS", "AGE", "RECYCLES", "LAST REASON", "IN FLIGHT")


def format_table(status: GroupStatus) -> str:
    """The human table: a row per slot, then the summary line."""
    rows = [_COLUMNS]
    for w in status.workers:
        inflight = ("%s %s (%s)" % (w.inflight.method, w.inflight.uri,
                                    format_duration(w.inflight.seconds))
                    if w.inflight else "-")
        rows.append((w.name, w.state, str(w.pid) if w.pid else "-", format_size(w.rss_bytes),
                     "-" if w.requests is None else str(w.requests),
                     format_duration(w.age_seconds),
                     "-" if w.recycles is None else str(w.recycles),
                     w.last_reason or "-", inflight))
    return _aligned(rows) + summary_line(status) + "\n"


def _aligned(rows: list) -> str:
    """Rows as text columns padded to their widest cell (the last cell is not padded)."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(r, widths)) + "  " + r[-1]
             for r in rows]
    return "\n".join(line.rstrip() for line in lines) + "\n"


def to_json(status: GroupStatus) -> dict:
    """The documented ``status --json`` object (see the module docstring)."""
    return {
        "group": status.group,
        "count": status.count,
        "standby": status.standby,
        "ready": status.ready,
        "recycles": status.recycles,
        "generated_at": status.generated_at,
        "drift": None if status.drift is None else list(status.drift),
        "generation": status.generation,
        "switch": None if status.switch is None else dict(status.switch),
        "supervisord": None if status.supervisord is None else dict(status.supervisord),
        "workers": [worker_json(w) for w in status.workers],
    }



_HOST_COLUMNS = ("HOST", "WORKER", "STATE", "PID", "AGE", "NOTE")
_FULL_HOST_COLUMNS = ("HOST", "WORKER", "STATE", "PID", "RSS", "REQS", "AGE", "RECYCLES", "NOTE")

#: Printed under the multi-host table: what it cannot show, and where to look.
REMOTE_NOTE = ("Remote hosts show supervisord's view only (state, pid, uptime); RSS, requests, "
               "in-flight requests and recycles: FCGI_TOOLKIT_HOST=NAME fcgi-toolkit status "
               "on that host.")


def format_hosts_table(status: DeploymentStatus) -> str:
    """The multi-host table: a row per slot of every host (one row for a
    host that is down), a summary line, then :data:`REMOTE_NOTE`."""
    full = any(h.full for h in status.hosts)
    columns = _FULL_HOST_COLUMNS if full else _HOST_COLUMNS
    rows = [columns]
    for h in status.hosts:
        if not h.up:
            rows.append((h.name, "-", "down") + ("-",) * (len(columns) - 4) + (h.error or "",))
            continue
        for w in h.workers:
            notes = ["backup host"] if h.backup else []
            if w.inflight:
                notes.append("%s %s (%s)" % (w.inflight.method, w.inflight.uri,
                                             format_duration(w.inflight.seconds)))
            counts = (format_size(w.rss_bytes), "-" if w.requests is None else str(w.requests))
            rows.append((h.name, w.name, w.state, str(w.pid) if w.pid else "-")
                        + (counts if full else ()) + (format_duration(w.age_seconds),)
                        + (("-" if w.recycles is None else str(w.recycles),) if full else ())
                        + ("; ".join(notes),))
    note = "" if all(h.full for h in status.hosts if h.up) and full else REMOTE_NOTE + "\n"
    under_way = ""
    if status.rollout is not None:
        from fcgi_toolkit.rollout import format_state
        under_way = format_state(status.rollout, status.generated_at) + "\n"
    return _aligned(rows) + hosts_summary_line(status) + "\n" + under_way + note


def hosts_summary_line(status: DeploymentStatus) -> str:
    down = status.down
    up = len(status.hosts) - len(down)
    line = "%s: %d host%s, %d up, %d down" % (status.group, len(status.hosts),
                                            "" if len(status.hosts) == 1 else "s", up, len(down))
    if down:
        line += " (%s)" % ", ".join(down)
    running = sum(h.running for h in status.hosts)
    wanted = sum(h.count for h in status.hosts)
    return line + "; %d/%d workers running" % (running, wanted)


def hosts_to_json(status: DeploymentStatus) -> dict:
    """The documented multi-host ``status --json`` object (module docstring)."""
    return {
        "group": status.group,
        "generated_at": status.generated_at,
        "up": len(status.hosts) - len(status.down),
        "down": status.down,
        "rollout": dict(status.rollout) if status.rollout is not None else None,
        "hosts": [{
            "name": h.name,
            "address": h.address,
            "control_url": h.control_url,
            "backup": h.backup,
            "up": h.up,
            "error": h.error,
            "count": h.count,
            "standby": h.standby,
            "running": h.running,
            "workers": [worker_json(w) for w in h.workers],
        } for h in status.hosts],
    }
