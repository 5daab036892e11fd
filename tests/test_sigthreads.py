"""Helper threads block the asynchronous signals from their first instruction."""
import signal
import threading

from fcgi_toolkit import sigthreads


def test_thread_starts_with_the_asynchronous_signals_blocked_and_the_caller_keeps_its_mask():
    before = signal.pthread_sigmask(signal.SIG_BLOCK, [])
    seen = {}
    done = threading.Event()

    def first_instruction():
        seen["mask"] = signal.pthread_sigmask(signal.SIG_BLOCK, [])
        done.set()

    thread = sigthreads.start(first_instruction, "probe")
    assert done.wait(10)
    thread.join(10)
    assert thread.daemon and thread.name == "probe"
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2,
                signal.SIGQUIT, signal.SIGCHLD):
        assert sig in seen["mask"], sig
    for sig in sigthreads.SYNCHRONOUS:
        assert sig not in seen["mask"], sig
    assert signal.pthread_sigmask(signal.SIG_BLOCK, []) == before


def test_parent_watch_thread_takes_no_stop_or_promote_signal():
    from fcgi_toolkit import lifeline
    seen = {}
    done = threading.Event()

    def getppid():
        seen.setdefault("mask", signal.pthread_sigmask(signal.SIG_BLOCK, []))
        done.set()
        return 1

    watch = lifeline.ParentWatch(1, lambda: None, getppid=getppid, interval=0.01).start()
    try:
        assert done.wait(10)
    finally:
        watch.stop()
    assert {signal.SIGTERM, signal.SIGINT, signal.SIGUSR2} <= seen["mask"]
