"""What a watched file's change asks for: the deployment file is applied, any
other file means a rolling reload.

The coordinator's :class:`~fcgi_toolkit.triggers.FileWatch` debounces the
changes; :class:`WatchedFiles` acts on them once per pass.  The deployment
file is applied by ``fcgi-toolkit apply`` in a child process (which asks the
watchdog back through a request file); one apply at a time, a change during
it is applied again after it.
"""
from __future__ import annotations

import logging
import subprocess
import sys
from typing import Any, Callable, Optional

from fcgi_toolkit import applying
from fcgi_toolkit.policy import Snapshot

log = logging.getLogger("fcgi_toolkit.watchdog")


class WatchedFiles:
    """The watched-file trigger of one coordinator (its ``watch``, ``deploy_path``
    and reloads); ``spawn`` (subprocess.Popen) is injected."""

    def __init__(self, coordinator: Any, spawn: Callable[..., Any] = subprocess.Popen):
        self.co = coordinator
        self.spawn = spawn
        self.applying: Optional[Any] = None     # the Popen of an apply of the deploy file

    def serve(self, snap: Snapshot, now: float) -> None:
        co = self.co
        if self.applying is not None and self.applying.poll() is not None:
            self.applying = None                # reaped: the apply has answered
        if co.watch.due(now, may_fire=co.state.reload is None):
            self._changed(snap, now, co.watch.take_changed())

    def _changed(self, snap: Snapshot, now: float, changed: set[str]) -> None:
        deploy_path = self.co.deploy_path
        if deploy_path in changed:
            if self.applying is None:
                log.info("deployment file %s changed: applying it", deploy_path)
                # stdout is the event protocol: the child writes to our log (stderr).
                self.applying = self.spawn(applying.apply_command(deploy_path),
                                           stdin=subprocess.DEVNULL, stdout=sys.stderr)
            else:
                self.co.watch.changed.add(deploy_path)   # again after this apply
                self.co.watch.changed_at = now
            changed = changed - {deploy_path}
        if changed:
            self.co.reloads.begin(snap, now, "watch")
