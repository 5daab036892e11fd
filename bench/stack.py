"""A contender plus its own nginx, and the session that owns every stack.

The :class:`Session` creates one temporary directory for the run and stops
every stack it started, also when a scenario fails or the run is
interrupted, so the bench never leaves a process behind.
"""
from __future__ import annotations

import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from typing import Optional

from bench.contenders import KINDS, Contender, Spec
from bench.nginx import Nginx, free_port

log = logging.getLogger("bench")


@dataclass
class Stack:
    contender: Contender
    nginx: Nginx

    @property
    def label(self) -> str:
        return self.contender.label

    @property
    def url(self) -> str:
        return self.nginx.url

    def stop(self) -> None:
        try:
            self.nginx.stop()
        finally:
            self.contender.stop()


class Session:
    """Owns the run's temporary directory and every stack started in it."""

    def __init__(self, keep: bool = False):
        # Short base path: unix socket paths must stay under ~100 bytes.
        self.root = tempfile.mkdtemp(prefix="fcgibench-", dir="/tmp")
        self.keep = keep
        self._stacks: list[Stack] = []
        self._n = 0

    def start(self, kind: str, spec: Spec, label: str = "", access_log: bool = False,
              timeout: float = 90.0) -> Stack:
        self._n += 1
        workdir = os.path.join(self.root, "%02d-%s" % (self._n, kind))
        os.makedirs(workdir)
        contender = KINDS[kind](workdir, spec, label)
        log.info("starting %s in %s", contender.label, workdir)
        contender.start(timeout)
        nginx = Nginx(workdir, free_port())
        stack = Stack(contender, nginx)
        self._stacks.append(stack)
        nginx.start(contender.socket_path, keepalive=spec.keepalive, access_log=access_log,
                    protocol=contender.protocol)
        return stack

    def stop(self, stack: Stack) -> None:
        if stack in self._stacks:
            self._stacks.remove(stack)
        stack.stop()

    def close(self) -> None:
        while self._stacks:
            stack = self._stacks.pop()
            try:
                stack.stop()
            except Exception:  # keep stopping the others; report this one
                log.exception("stopping %s", stack.label)
        if not self.keep:
            shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> "Session":
        return self

    def __exit__(self, *exc) -> Optional[bool]:
        self.close()
        return None
