"""Tier 3: issue #13 — when supervisord dies, nothing of the deployment outlives it.

supervisord is killed with SIGKILL under continuous load while a slow
request is in flight: every process it started (workers, watchdog, nginx)
ends by itself, the slow request gets its full response, and a new
``fcgi-toolkit run`` starts and serves.  An address held by a program that
is not part of the deployment is one line and exit 2.  ``fcgi-toolkit
stop`` stops a deployment whose ``run`` was killed.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading

import psutil
import pytest

from conftest import requires_nginx
from harness import Cluster, free_port, wait_for

from fcgi_toolkit import leftovers

pytestmark = [pytest.mark.integration, requires_nginx]

SLOW = "/sleep?s=4"


def descendants(pid: int) -> list[psutil.Process]:
    return psutil.Process(pid).children(recursive=True)


def alive(procs: list[psutil.Process]) -> list[psutil.Process]:
    """Those still running (a zombie waiting for its new parent to reap it has ended)."""
    out = []
    for p in procs:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                out.append(p)
        except psutil.NoSuchProcess:
            pass
    return out


def kinds(dep, procs: list[psutil.Process]) -> list[str]:
    sig = leftovers.Signature.of(dep)
    return sorted(k.value for k in (leftovers.classify(p.cmdline(), sig) for p in procs) if k)


def serving(c, uri: str):
    for rec in c.scoreboard():
        if rec is not None and rec.inflight and rec.uri == uri:
            return rec
    return None


class Run:
    """``fcgi-toolkit run -c DEPLOY`` in the background, its output in a file."""

    def __init__(self, c: Cluster, name: str = "run"):
        self.c = c
        self.out_path = os.path.join(c.base_dir, name + ".out")
        self._out = open(self.out_path, "wb")
        self.proc = subprocess.Popen([sys.executable, "-m", "fcgi_toolkit", "run", "-c", c.deploy_path],
                                     stdin=subprocess.DEVNULL, stdout=self._out,
                                     stderr=subprocess.STDOUT, start_new_session=True)

    def output(self) -> str:
        with open(self.out_path, encoding="utf-8", errors="replace") as f:
            return f.read()

    def wait_serving(self, timeout: float = 60):
        def page():
            if self.proc.poll() is not None:
                raise AssertionError("run exited %s:\n%s" % (self.proc.returncode, self.output()))
            try:
                r = self.c.get("/pid", timeout=10)
            except OSError:
                return None
            return r if r.status == 200 else None
        return wait_for(page, timeout, "the new run to serve")

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        self._out.close()
        return self.proc.returncode


@pytest.fixture
def runs():
    started: list[Run] = []

    def factory(c: Cluster, name: str = "run") -> Run:
        r = Run(c, name)
        started.append(r)
        return r

    yield factory
    for r in started:
        r.stop()
        # Whatever this run started, also if the test failed half-way.
        leftovers.end(leftovers.scan(r.c.dep), 5)


def _workers(kind: str) -> dict:
    workers = {"count": 2, "standby": 1, "threads": 2, "graceful_timeout": "20s"}
    if kind == "tcp":
        workers["socket"] = "tcp://127.0.0.1:%d" % free_port()
    return workers


@pytest.mark.parametrize("kind,start_at_once", [("tcp", False), ("unix", False), ("tcp", True)],
                         ids=["tcp", "unix", "tcp-run-while-draining"])
def test_supervisord_sigkill_leaves_nothing_and_run_starts_again(cluster, runs, kind, start_at_once):
    c = cluster(workers=_workers(kind))
    before = descendants(c.proc.pid)
    # Two serving workers and the warm standby: three worker processes.
    assert kinds(c.dep, before).count("worker") == 3 and "watchdog" in kinds(c.dep, before)
    assert len(c.ready_workers()) == 2 and len(c.warm_workers()) == 1
    assert "nginx" in kinds(c.dep, before)

    result = {}
    slow = threading.Thread(target=lambda: result.update(r=c.get(SLOW, timeout=60)))
    slow.start()
    rec = wait_for(lambda: serving(c, SLOW), 15, "the slow request in a worker")
    load = c.load("/pid", threads=2, duration=60, timeout=10, pause=0.01).start()
    try:
        wait_for(lambda: load.statuses[200] >= 20, 30, "load being served")
        os.kill(c.proc.pid, signal.SIGKILL)
        c.proc.wait(10)
        if start_at_once:
            run = runs(c)   # while the old workers still drain the slow request
        wait_for(lambda: not alive(before), 40,
                 "every process of the killed supervisord to end: %s" % alive(before))
        slow.join(60)
        response = result["r"]
        assert response.status == 200 and response.body == b"slept %d\n" % rec.pid
    finally:
        load.stop()
        load.join()
    assert load.statuses[200] >= 20, load.summary()
    if not start_at_once:
        run = runs(c)
    first = run.wait_serving()
    assert int(first.body) not in {p.pid for p in before}
    out = run.output()
    assert "Traceback" not in out and "Address already in use" not in out, out
    if start_at_once:
        line = next(l for l in out.splitlines() if "a previous supervisord left" in l)
        assert "pid file (supervisord pid %d, gone)" % c.proc.pid in line, out
        assert "worker" in line and str(rec.pid) in line, out
    new = descendants(run.proc.pid)
    assert run.stop() == 0, run.output()
    wait_for(lambda: not alive(new), 30, "the new run's processes to end")
    assert not leftovers.scan(c.dep)


@pytest.mark.parametrize("kind", ["tcp", "unix"])
def test_address_held_by_another_program_is_one_line_and_exit_2(tmp_path, kind):
    c = Cluster(tmp_path / "c", workers=_workers(kind), nginx={"managed": False})
    code = ("import socket, sys, time\n"
            "s = socket.socket(socket.AF_UNIX if sys.argv[1] == 'unix' else socket.AF_INET)\n"
            "s.bind(sys.argv[2] if sys.argv[1] == 'unix' else ('127.0.0.1', int(sys.argv[2])))\n"
            "s.listen(8)\nprint('listening', flush=True)\ntime.sleep(120)\n")
    where = c.dep.socket_path if kind == "unix" else c.dep.socket_url.rpartition(":")[2]
    holder = subprocess.Popen([sys.executable, "-c", code, kind, where], stdout=subprocess.PIPE,
                              stdin=subprocess.DEVNULL)
    try:
        assert holder.stdout.readline() == b"listening\n"
        r = c.toolkit("run", "-c", c.deploy_path)
        assert r.returncode == 2, r.stdout + r.stderr
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1, r.stderr
        assert "workers.socket" in lines[0] and "pid %d" % holder.pid in lines[0]
        assert "not part of this deployment" in lines[0]
        assert not os.path.exists(c.dep.supervisord_conf), "nothing written"
        assert not leftovers.scan(c.dep), "nothing left running"
        assert holder.poll() is None
        if kind == "unix":
            assert os.path.exists(c.dep.socket_path), "the other program's socket file kept"
        else:
            socket.create_connection(("127.0.0.1", int(where)), timeout=5).close()
    finally:
        holder.kill()
        holder.wait(10)
        c.stop()


def test_run_killed_then_stop_ends_everything(tmp_path, runs):
    c = Cluster(tmp_path / "c", workers=_workers("unix"))
    try:
        run = runs(c)
        run.wait_serving()
        supervisord = psutil.Process(run.proc.pid).children()[0]
        procs = [supervisord] + descendants(supervisord.pid)
        os.kill(run.proc.pid, signal.SIGKILL)
        run.proc.wait(10)
        # Documented: without its run, supervisord keeps the deployment serving.
        assert c.get("/pid").status == 200
        r = c.toolkit("stop", "-c", c.deploy_path)
        assert r.returncode == 0 and "stopped" in r.stdout, r.stdout + r.stderr
        assert "asking supervisord (pid %d) to shut down" % supervisord.pid in r.stdout
        wait_for(lambda: not alive(procs), 10, "the deployment's processes to end")
        assert not os.path.exists(c.dep.supervisord_pidfile), "an orderly shutdown"
        r = c.toolkit("stop", "-c", c.deploy_path)
        assert r.returncode == 0 and "is not running" in r.stdout, r.stdout + r.stderr
    finally:
        c.stop()
