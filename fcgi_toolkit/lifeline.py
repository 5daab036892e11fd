"""A supervised process's lifeline to its supervisord: it ends when supervisord dies.

Every process supervisord starts for a deployment (the workers, the
watchdog listener, the metrics server, the managed nginx) must not outlive
it: an orphaned worker keeps the FastCGI socket (the next supervisord
cannot bind a TCP address, or binds a new unix socket file while the old
workers serve nobody), unsupervised, forever.  Two mechanisms, because
neither covers every case alone:

* Linux's parent-death signal (``prctl(PR_SET_PDEATHSIG)``), armed by the
  process itself after its exec: the kernel sends it when the thread that
  forked us (supervisord is single-threaded) exits, however it died.  The
  kernel clears it on a credential change and on the exec of a setuid
  binary; supervisord's ``user=`` setuid happens before the exec, so arming
  it afterwards keeps it, and the kernel needs no permission to send it to
  a process of another user.  It survives our own exec (of a binary that is
  not setuid), which is how the managed nginx gets it (:func:`run`).
* A watch thread (:class:`ParentWatch`) comparing ``os.getppid()`` with the
  parent we started with (an orphan is reparented to init or a subreaper),
  twice a second, for where the signal is not armed (a failed prctl).

Either one delivers the process's own stop signal to itself, so the stop
takes the existing graceful path: a worker's SIGTERM handler sets its drain
flag, finishes in-flight requests within ``workers.graceful_timeout`` and
exits.  The watchdog listener needs neither: supervisord held the other end
of its stdin, so it reads end of input and exits.

The window before either is armed (supervisord dying between its fork and
our prctl) is closed by :func:`orphaned_before_arming`: under supervisord,
a parent that is not the supervisord of the deployment's pid file means we
are an orphan already.

``fcgi-toolkit lifeline --pidfile PIDFILE --signal QUIT -- PROGRAM ARGS``
arms the signal and execs PROGRAM (supervisord runs the managed nginx this
way: nginx's master does not watch its parent; QUIT is its graceful stop).
"""
from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import logging
import os
import signal
import sys
import threading
from typing import Callable, Mapping, Optional

from fcgi_toolkit import sigthreads

log = logging.getLogger("fcgi_toolkit.lifeline")

#: From <linux/prctl.h>.
PR_SET_PDEATHSIG = 1
#: How often :class:`ParentWatch` looks at its parent (seconds).
WATCH_INTERVAL = 0.5


def set_parent_death_signal(signum: int) -> bool:
    """Ask the kernel to send ``signum`` to this process when its parent dies.

    Returns False (and arms nothing) where prctl is not available or fails.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    except OSError:
        return False
    if libc.prctl(PR_SET_PDEATHSIG, ctypes.c_ulong(signum), 0, 0, 0) != 0:
        log.warning("prctl(PR_SET_PDEATHSIG) failed: %s", os.strerror(ctypes.get_errno()))
        return False
    return True


def read_pid(path: str) -> Optional[int]:
    """The pid in a pid file; None if it is missing, unreadable or not a pid."""
    try:
        with open(path, encoding="ascii") as f:
            text = f.read().strip()
    except (OSError, UnicodeDecodeError):
        return None
    return int(text) if text.isdigit() and int(text) > 0 else None


def orphaned_before_arming(pidfile: str, ppid: int, environ: Mapping[str, str],
                           parent_is_supervisord: bool = False) -> bool:
    """Whether a process started by supervisord (``SUPERVISOR_ENABLED`` in its
    environment) lost that supervisord before it armed its lifeline.

    supervisord writes its pid file before it starts any child, so a parent
    that is not that pid means that supervisord is gone (we were reparented),
    or that a newer one replaced it.  A parent that is itself a supervisord
    is never an orphan's: under the distribution's supervisord (``install``)
    the toolkit's own pid file may be a stale one from an earlier ``run``.
    Without the variable or a readable pid file there is nothing to compare:
    False.
    """
    if "SUPERVISOR_ENABLED" not in environ or parent_is_supervisord:
        return False
    pid = read_pid(pidfile)
    return pid is not None and pid != ppid


def is_supervisord(pid: int) -> bool:
    """Whether process ``pid`` runs supervisord (its command line says so)."""
    try:
        with open("/proc/%d/cmdline" % pid, "rb") as f:
            argv = f.read().split(b"\0")
    except OSError:
        return False
    return any(os.path.basename(arg).startswith(b"supervisord") or arg == b"supervisor.supervisord"
               for arg in argv[:3])


class ParentWatch:
    """Calls ``on_orphaned`` once, when the parent pid is no longer ``parent``.

    :meth:`check` is one look (tested with a fake ``getppid``); :meth:`start`
    runs it every ``interval`` seconds in a daemon thread until it fired.
    """

    def __init__(self, parent: int, on_orphaned: Callable[[], None],
                 getppid: Callable[[], int] = os.getppid, interval: float = WATCH_INTERVAL):
        self.parent = parent
        self.on_orphaned = on_orphaned
        self.getppid = getppid
        self.interval = interval
        self.fired = False
        self._stop = threading.Event()

    def check(self) -> bool:
        """Look once; True (and ``on_orphaned`` called, the first time only) if orphaned."""
        if not self.fired and self.getppid() != self.parent:
            self.fired = True
            self.on_orphaned()
        return self.fired

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            if self.check():
                return

    def start(self) -> "ParentWatch":
        # The signals are for the main thread (a worker's handlers run there
        # and its blocking waits must be interrupted there).
        sigthreads.start(self._run, "fcgi-parent-watch")
        return self

    def stop(self) -> None:
        self._stop.set()


def _signal_self(signum: int, supervisord: int) -> Callable[[], None]:
    def send() -> None:
        log.info("supervisord (pid %d) is gone: stopping as on %s",
                 supervisord, signal.Signals(signum).name)
        os.kill(os.getpid(), signum)
    return send


def guard(signum: int, pidfile: str) -> ParentWatch:
    """Arm both mechanisms for this process: on supervisord's death it gets
    ``signum`` (the parent-death signal only when supervisord started us,
    the watch whatever the parent).  Install the handler for ``signum`` first (its default action
    would end the process at once).  When supervisord is gone already, the
    signal is sent at once."""
    # The kernel watches the parent *thread*: supervisord has one.  A process
    # started by hand (a test, a benchmark) may have been forked by a thread
    # that ends long before its parent process: the watch alone covers it.
    under_supervisord = "SUPERVISOR_ENABLED" in os.environ
    armed = under_supervisord and set_parent_death_signal(signum)
    parent = os.getppid()
    stop_self = _signal_self(signum, parent)
    if under_supervisord and not armed:
        log.warning("no parent-death signal on this system: watching the parent pid %d "
                    "every %.1fs", parent, WATCH_INTERVAL)
    watch = ParentWatch(parent, stop_self)
    if orphaned_before_arming(pidfile, parent, os.environ, is_supervisord(parent)):
        watch.fired = True
        _signal_self(signum, read_pid(pidfile) or parent)()
    return watch.start()


# --------------------------------------------------------------------------
# Command: the exec wrapper
# --------------------------------------------------------------------------

def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--pidfile", required=True,
                        help="supervisord's pid file (to notice a supervisord gone already)")
    parser.add_argument("--signal", default="TERM",
                        help="the program's graceful stop signal (default: %(default)s)")
    parser.add_argument("argv", nargs=argparse.REMAINDER, metavar="-- PROGRAM ARGS",
                        help="the program to run")


def run(args: argparse.Namespace) -> int:
    from supervisor.datatypes import signal_number

    argv = args.argv[1:] if args.argv[:1] == ["--"] else args.argv
    if not argv:
        print("fcgi-toolkit lifeline: no program given (-- PROGRAM ARGS)", file=sys.stderr)
        return 2
    try:
        signum = signal_number(args.signal)
    except ValueError as exc:
        print("fcgi-toolkit lifeline: --signal %s: %s" % (args.signal, exc), file=sys.stderr)
        return 2
    set_parent_death_signal(signum)
    if orphaned_before_arming(args.pidfile, os.getppid(), os.environ,
                              is_supervisord(os.getppid())):
        print("fcgi-toolkit lifeline: supervisord is gone; not starting %s" % argv[0],
              file=sys.stderr)
        return 1
    try:
        os.execvp(argv[0], argv)
    except OSError as exc:
        print("fcgi-toolkit lifeline: cannot run %s: %s" % (argv[0], exc), file=sys.stderr)
        return 127
