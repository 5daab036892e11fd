"""The watchdog's fast poll between passes: memory reads of the scoreboard only.

Every :data:`RSS_POLL` seconds (only with ``limits.max_rss`` and a
scoreboard) the listener asks :meth:`RssPoll.urgent` whether a full pass is
due now: a worker published an RSS over the limit
(:func:`fcgi_toolkit.policy.rss_alarms`), a replacement being waited for
says ready in its slot, or a new warm standby says so while a worker over a
limit waits for one.  No RPC, no psutil: a pass does the rest.
"""
from __future__ import annotations

import logging
from typing import Any

from fcgi_toolkit import policy
from fcgi_toolkit.names import format_size
from fcgi_toolkit.recycle import Phase

log = logging.getLogger("fcgi_toolkit.watchdog")

#: Seconds between two fast polls of the workers' published RSS.
RSS_POLL = 0.1


class RssPoll:
    """The fast poll of one coordinator (its last snapshot, limits, recall, state)."""

    def __init__(self, coordinator: Any):
        self.co = coordinator

    def interval(self) -> float:
        """Seconds between fast polls of the scoreboard (0: no fast poll)."""
        if not self.co.limits.max_rss or self.co.sampler.scoreboard is None:
            return 0.0
        return min(RSS_POLL, self.co.check_interval)

    def urgent(self) -> bool:
        """Whether a worker's published RSS asks for a full pass now."""
        co = self.co
        last, board = co.last_snapshot, co.sampler.scoreboard
        if last is None or board is None or not co.limits.max_rss or co.standing_by:
            return False
        if self._replacement_ready(board) or self._standby_for_a_waiting_breach(board):
            return True
        records = {slot.name: board.read(slot.index) for slot in last.slots if slot.pid}
        alarms = policy.rss_alarms(last, records, co.limits, co.memory())
        for alarm in alarms:
            co.recall.alarmed[alarm.slot] = (alarm.pid, alarm.rss_time)
            log.info("%s pid %d published rss %s > %s: checking now", alarm.slot, alarm.pid,
                     format_size(alarm.rss), format_size(co.limits.max_rss))
        return bool(alarms)

    def _standby_for_a_waiting_breach(self, board: Any) -> bool:
        """Whether a worker became a warm standby (once per pid) while a worker
        over a limit waits for room (a pass saw it over, no recycle of it yet)."""
        co = self.co
        if not co.limits.warm or not co.recall.first_breach:
            return False
        new = False
        for slot in co.last_snapshot.slots:
            rec = board.read(slot.index)
            if rec is not None and rec.standby and rec.pid not in co.recall.warm_seen:
                co.recall.warm_seen.add(rec.pid)
                new = True
        return new

    def _replacement_ready(self, board: Any) -> bool:
        """Whether a replacement being waited for says ready in its slot (once per pid)."""
        co = self.co
        for op in co.state.recycle.values():
            if op.phase != Phase.STARTING:
                continue
            rec = board.read(co.slot_names.index(op.new_slot))
            if rec is not None and rec.ready and rec.pid not in co.recall.ready_seen:
                co.recall.ready_seen.add(rec.pid)
                return True
        return False
