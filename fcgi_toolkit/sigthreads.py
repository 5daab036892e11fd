"""Helper threads that never take the process's asynchronous signals.

A worker's signal handlers run in its main thread, and only a signal the
kernel delivers to the main thread interrupts the main thread's own wait
(``time.sleep`` inside the application, a ``select``): a SIGTERM delivered
to a helper thread runs the handler only when the main thread next executes
Python code, which may be the end of a long request.  So every helper thread
blocks the asynchronous signals, and it does so from its first instruction:
:func:`start` blocks them in the creating thread around ``Thread.start``
(``pthread_create`` copies the creator's mask), rather than letting the new
thread block them itself once it runs, which left a window in which the
kernel could pick it.  A signal that arrives in the main thread during those
few microseconds stays pending and is delivered when the mask is restored.
"""
from __future__ import annotations

import signal
import threading
from typing import Callable

#: Raised by a thread's own instruction (a fault), so they stay with that thread.
SYNCHRONOUS = frozenset({signal.SIGSEGV, signal.SIGBUS, signal.SIGFPE, signal.SIGILL,
                         signal.SIGABRT, signal.SIGTRAP, signal.SIGSYS})
#: What a helper thread blocks: everything another process (or the kernel on
#: its behalf) sends.
ASYNCHRONOUS = frozenset(signal.valid_signals()) - SYNCHRONOUS


def start(target: Callable[[], None], name: str) -> threading.Thread:
    """Start a daemon thread running ``target`` with :data:`ASYNCHRONOUS` blocked."""
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, ASYNCHRONOUS)
    try:
        thread = threading.Thread(target=target, name=name, daemon=True)
        thread.start()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)
    return thread
