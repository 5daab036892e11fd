"""A host's new supervisord, asked for over its control port: the host side
of a multi-host rollout (:mod:`fcgi_toolkit.rollout`).

``run`` records the exact bytes of the deployment file it started from
(``<runtime.dir>/applied.toml``), which its processes read instead of the
file (:func:`pinned`; each ``apply`` that applies something writes the
file's bytes there first, :func:`pin`), and tells its supervisord it is
there to start it again (:data:`RUN_ENV` in supervisord's environment).  The web
server, once the host is out of nginx's rotation, calls the host's
``fcgi.respawn()`` (:mod:`fcgi_toolkit.rpcinterface`), which

* checks the host's file is the web server's (its sha256) and renders it in
  memory (a bad file: one line, nothing changed);
* keeps the running file as ``previous.toml`` and writes the request
  ``respawn.json``;
* asks supervisord to shut down: it drains its workers and exits.

``run`` then finds the request and executes itself again (a new process
image: an upgraded supervisor or fcgi-toolkit takes effect), which renders
the file and starts a new supervisord: a new generation of the host.
``fcgi.respawn(previous=True)`` does the same with ``previous.toml`` parsed
as if it were the deployment file: the host's previous deployment again,
while its file still holds the change that failed.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import replace
from typing import Optional

from fcgi_toolkit import settings, statefile
from fcgi_toolkit.settings import Deployment

#: Set by ``run`` in its supervisord's environment: a run waits to start it again.
RUN_ENV = "FCGI_TOOLKIT_RUN"
#: The bytes of the deployment file the running supervisord was started from.
APPLIED = "applied.toml"
#: The file the host ran before its last respawn (what a rollback starts).
PREVIOUS = "previous.toml"
#: The request: present between fcgi.respawn() and run starting again.
REQUEST = "respawn.json"


def digest(path: str) -> str:
    """The sha256 of a deployment file's bytes (the web server's and each
    host's copy must be the same file)."""
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def _path(dep: Deployment, name: str) -> str:
    return os.path.join(dep.runtime_dir, name)


def applied_path(dep: Deployment) -> str:
    return _path(dep, APPLIED)


def pinned(dep: Deployment) -> Deployment:
    """``dep`` as ``run`` renders it: its supervised commands read
    ``applied.toml`` (``--start-from``), not the file, so an edit of the file
    takes effect only through ``apply`` (or a host's rollout)."""
    return replace(dep, source=applied_path(dep))


def record_start(dep: Deployment, data: bytes) -> None:
    """What ``run`` started from (called once the configs are written)."""
    statefile.write_bytes_atomic(applied_path(dep), data)


def pin(dep: Deployment, data: bytes) -> Optional[bytes]:
    """``apply``: make ``data`` (the file being applied) what the running
    deployment's processes read, before anything asks them to; the bytes it
    replaced (to :func:`unpin` if nothing is applied), or None when the
    deployment does not read ``applied.toml`` (not started by ``run``)."""
    try:
        with open(applied_path(dep), "rb") as f:
            before = f.read()
    except FileNotFoundError:
        return None
    statefile.write_bytes_atomic(applied_path(dep), data)
    return before


def unpin(dep: Deployment, before: Optional[bytes]) -> None:
    """Undo :func:`pin`: nothing was applied."""
    if before is not None:
        statefile.write_bytes_atomic(applied_path(dep), before)


def load_for_start(path: str, start_from: Optional[str]) -> tuple[Deployment, bytes]:
    """The deployment ``run`` starts and its bytes: the file at ``path``, or
    ``start_from``'s bytes read as if they were that file (a rollback: paths
    in it resolve against the file's directory, as before, and the rendered
    supervised commands read the same bytes)."""
    data = settings.read_bytes(start_from or path)
    return settings.loads(data, path, source=start_from or ""), data


def supervised() -> bool:
    """Whether this process (a supervisord) was started by ``run``."""
    return bool(os.environ.get(RUN_ENV))


def request(dep: Deployment, previous: bool) -> None:
    """Ask ``run`` to start again: from the file, keeping the running one as
    ``previous.toml``; or (``previous``) from ``previous.toml``.  ValueError
    (one line) when there is nothing to start from."""
    applied, kept = _path(dep, APPLIED), _path(dep, PREVIOUS)
    if previous:
        if not os.path.exists(kept):
            raise ValueError("%s: no previous deployment to start again" % kept)
    else:
        if not os.path.exists(applied):
            raise ValueError("%s: missing: this supervisord was not started by fcgi-toolkit run"
                             % applied)
        with open(applied, "rb") as f:
            statefile.write_bytes_atomic(kept, f.read())
    statefile.write_json_atomic(_path(dep, REQUEST), {"start_from": kept if previous else ""})


def take(dep: Deployment) -> Optional[str]:
    """The request ``run`` finds once its supervisord exited, removed: what to
    start from ("" the file, else a path); None when there is none."""
    data = statefile.read_json(_path(dep, REQUEST), quiet=True)
    discard(dep)
    if not isinstance(data, dict):
        return None
    return str(data.get("start_from") or "")


def discard(dep: Deployment) -> None:
    """Forget a request (the operator stopped the host meanwhile)."""
    statefile.remove(_path(dep, REQUEST))
