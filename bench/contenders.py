"""The contenders, each started in its own work directory on a unix socket.

- :class:`Ours`: ``fcgi-toolkit run`` (supervisord + our worker + the
  watchdog listener), nginx left to the bench (``nginx.managed = false``).
- :class:`PlainSupervisord`: what users run today: supervisord's
  ``[fcgi-program]`` with a bare flup6 ``WSGIServer`` per process, restarted
  with ``supervisorctl restart`` and capped with superlance's memmon.
- :class:`Uwsgi`: uWSGI's ``--fastcgi-socket`` with a master,
  ``--max-requests``, ``--reload-on-rss`` and chain reload.

All take the same :class:`Spec` (app, workers, threads, limits) so one
scenario drives them alike.  Every process is started in a new session and
killed by process group on :meth:`Contender.stop`.
"""
from __future__ import annotations

import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import xmlrpc.client
from dataclasses import dataclass, field
from typing import Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclass(frozen=True)
class Spec:
    """What every contender is asked to run."""
    app: str = "bench.apps:hello"
    workers: int = 2
    threads: int = 1
    keepalive: int = 0            # nginx upstream keepalive (0: a connection per request)
    max_requests: int = 0
    max_rss: int = 0              # bytes, 0: off
    check_interval: float = 1.0   # ours: watchdog sampling interval
    env: tuple = ()               # extra (NAME, value) for the workers
    extra: dict = field(default_factory=dict, hash=False)


class ContenderError(RuntimeError):
    pass


def tool(name: str) -> Optional[str]:
    """An executable next to this interpreter (a venv's bin) or on PATH."""
    local = os.path.join(os.path.dirname(sys.executable), name)
    if os.access(local, os.X_OK):
        return local
    return shutil.which(name)


def _killpg(proc: Optional[subprocess.Popen], sig: int = signal.SIGKILL) -> None:
    if proc is None:
        return
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass


def _wait(predicate, timeout: float, what: str, interval: float = 0.1):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise ContenderError("timed out after %.0fs waiting for %s" % (timeout, what))


def supervisor_rpc(sock: str):
    """An XML-RPC proxy to the supervisord listening on unix socket ``sock``."""
    from supervisor.xmlrpc import SupervisorTransport
    return xmlrpc.client.ServerProxy(
        "http://127.0.0.1", transport=SupervisorTransport(None, None, "unix://" + sock))


class Contender:
    """One server setup under test.  Subclasses fill in the process details."""
    kind = "?"

    def __init__(self, workdir: str, spec: Spec, label: str = ""):
        self.workdir = workdir
        self.spec = spec
        self.label = label or self.kind
        self.proc: Optional[subprocess.Popen] = None
        self.mark_dir = os.path.join(workdir, "marks")
        os.makedirs(self.mark_dir, exist_ok=True)

    @property
    def socket_path(self) -> str:
        return os.path.join(self.workdir, "app.sock")

    def worker_env(self) -> dict:
        env = {"BENCH_MARK_DIR": self.mark_dir, "PYTHONPATH": ROOT}
        env.update(dict(self.spec.env))
        return env

    # -- to implement ---------------------------------------------------
    def start(self, timeout: float = 60.0) -> None:
        raise NotImplementedError

    def worker_pids(self) -> list[int]:
        raise NotImplementedError

    def reload(self) -> None:
        """A rolling (or, for the baseline, full) restart of every worker."""
        raise NotImplementedError

    # -- shared ---------------------------------------------------------
    def ready_pids(self) -> list[int]:
        """Workers that are running and have imported the app."""
        return [p for p in self.worker_pids()
                if os.path.exists(os.path.join(self.mark_dir, "ready-%d" % p))]

    def wait_ready(self, timeout: float = 60.0) -> list[int]:
        def ready():
            if self.proc is not None and self.proc.poll() is not None:
                raise ContenderError("%s exited %s: %s" % (self.label, self.proc.returncode,
                                                           self.log_tail(limit=600)))
            pids = self.ready_pids()
            return pids if len(pids) >= self.spec.workers else None
        return _wait(ready, timeout, "%d ready workers of %s" % (self.spec.workers, self.label))

    def log_tail(self, pattern: str = "*.log", limit: int = 2000) -> str:
        out = []
        for path in sorted(glob.glob(os.path.join(self.workdir, "**", pattern), recursive=True)):
            with open(path, errors="replace") as f:
                out.append("== %s\n%s" % (path, f.read()[-limit:]))
        return "\n".join(out)

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self._graceful_stop()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                pass
        _killpg(self.proc)
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            pass

    def _graceful_stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)


class _Supervised(Contender):
    """A contender run by a supervisord in the foreground (``-n``)."""
    group = "bench"

    @property
    def control_socket(self) -> str:
        return os.path.join(self.workdir, "supervisor.sock")

    def rpc(self):
        return supervisor_rpc(self.control_socket)

    def worker_pids(self) -> list[int]:
        try:
            infos = self.rpc().supervisor.getAllProcessInfo()
        except (OSError, xmlrpc.client.Error):
            return []
        return [i["pid"] for i in infos
                if i["group"] == self.group and i["statename"] == "RUNNING" and i["pid"]]

    def supervisorctl(self, *args: str, timeout: float = 60.0) -> subprocess.CompletedProcess:
        return subprocess.run([tool("supervisorctl") or "supervisorctl", "-c", self.conf_path] + list(args),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=timeout)

    @property
    def conf_path(self) -> str:
        return os.path.join(self.workdir, "supervisord.conf")


class PlainSupervisord(_Supervised):
    """supervisord ``[fcgi-program]`` + bare flup6 workers (+ memmon when max_rss is set)."""
    kind = "supervisord+flup"

    def render(self) -> str:
        s = self.spec
        env = ",".join('%s="%s"' % kv for kv in sorted(self.worker_env().items()))
        w = self.workdir
        text = """\
[unix_http_server]
file={w}/supervisor.sock
chmod=0700

[supervisord]
logfile={w}/supervisord.log
pidfile={w}/supervisord.pid
childlogdir={w}
nodaemon=true

[rpcinterface:supervisor]
supervisor.rpcinterface_factory = supervisor.rpcinterface:make_main_rpcinterface

[supervisorctl]
serverurl=unix://{w}/supervisor.sock

[fcgi-program:bench]
command={py} -m bench.flup_worker {app}
socket=unix://{sock}
socket_mode=0600
process_name=%(program_name)s_%(process_num)02d
numprocs={n}
directory={root}
autostart=true
autorestart=true
startsecs=1
stopsignal=TERM
stopwaitsecs=10
stopasgroup=true
killasgroup=true
redirect_stderr=true
stdout_logfile={w}/%(program_name)s_%(process_num)02d.log
environment={env}
""".format(w=w, py=sys.executable, app=s.app, sock=self.socket_path,
           n=s.workers, root=ROOT, env=env)
        if s.max_rss:
            memmon = tool("memmon")
            if not memmon:
                raise ContenderError("superlance's memmon is not installed (pip install superlance)")
            text += """
[eventlistener:memmon]
command={memmon} -g bench={size}
events=TICK_5
stderr_logfile={w}/memmon.log
""".format(memmon=memmon, size=s.max_rss, w=w)
        return text

    def start(self, timeout: float = 60.0) -> None:
        with open(self.conf_path, "w") as f:
            f.write(self.render())
        out = open(os.path.join(self.workdir, "supervisord-stdout.log"), "ab")
        self.proc = subprocess.Popen([tool("supervisord") or "supervisord", "-n", "-c", self.conf_path],
                                     stdout=out, stderr=out, start_new_session=True, cwd=self.workdir)
        out.close()
        try:
            self.wait_ready(timeout)
        except ContenderError:
            self.stop()
            raise

    def restart_one(self, index: int) -> subprocess.CompletedProcess:
        """``supervisorctl restart bench:bench_NN``: what a cron job or operator does."""
        return self.supervisorctl("restart", "bench:bench_%02d" % index)

    def reload(self) -> None:
        self.supervisorctl("restart", "bench:*")


class Uwsgi(Contender):
    """uWSGI master + N workers on ``--fastcgi-socket``."""
    kind = "uwsgi"

    @property
    def fifo(self) -> str:
        return os.path.join(self.workdir, "master.fifo")

    def command(self) -> list[str]:
        s = self.spec
        binary = tool("uwsgi")
        if not binary:
            raise ContenderError("uwsgi is not installed (pip install uwsgi)")
        module = s.app
        cmd = [binary, "--master", "--fastcgi-socket", self.socket_path, "--chmod-socket=600",
               "--processes", str(s.workers), "--module", module, "--chdir", ROOT,
               "--pythonpath", ROOT, "--lazy-apps", "--die-on-term", "--disable-logging",
               "--master-fifo", self.fifo, "--pidfile", os.path.join(self.workdir, "uwsgi.pid"),
               "--logto", os.path.join(self.workdir, "uwsgi.log"), "--listen", "128",
               # uWSGI ignores --max-requests and --reload-on-rss for a worker
               # younger than min-worker-lifetime (default 10 s); ours has no
               # such floor for request counts, and its RSS flap guard is
               # lowered the same way (Spec.extra["flap_window"]).
               # Spec.extra["min_worker_lifetime"] = None: uWSGI's default.
               ]
        if s.extra.get("min_worker_lifetime", 1) is not None:
            cmd += ["--min-worker-lifetime", str(s.extra.get("min_worker_lifetime", 1))]
        if s.threads > 1:
            cmd += ["--threads", str(s.threads)]
        if s.max_requests:
            cmd += ["--max-requests", str(s.max_requests)]
        if s.max_rss:
            cmd += ["--reload-on-rss", str(max(1, s.max_rss // (1024 * 1024)))]
        for k, v in sorted(self.worker_env().items()):
            cmd += ["--env", "%s=%s" % (k, v)]
        return cmd

    def start(self, timeout: float = 60.0) -> None:
        out = open(os.path.join(self.workdir, "uwsgi-stdout.log"), "ab")
        self.proc = subprocess.Popen(self.command(), stdout=out, stderr=out,
                                     start_new_session=True, cwd=self.workdir)
        out.close()
        try:
            self.wait_ready(timeout)
        except ContenderError:
            self.stop()
            raise

    def worker_pids(self) -> list[int]:
        import psutil
        if self.proc is None or self.proc.poll() is not None:
            return []
        try:
            return [c.pid for c in psutil.Process(self.proc.pid).children()
                    if c.status() != psutil.STATUS_ZOMBIE]
        except psutil.Error:
            return []

    def _fifo(self, command: bytes) -> None:
        fd = os.open(self.fifo, os.O_WRONLY | os.O_NONBLOCK)
        try:
            os.write(fd, command)
        finally:
            os.close(fd)

    def reload(self) -> None:
        """Chain reload: one worker at a time (needs --lazy-apps)."""
        self._fifo(b"c")

    def _graceful_stop(self) -> None:
        self.proc.send_signal(signal.SIGINT)


class Ours(_Supervised):
    """fcgi-toolkit: supervisord, our worker and the watchdog, from a deploy.toml."""
    kind = "fcgi-toolkit"

    @property
    def runtime_dir(self) -> str:
        return os.path.join(self.workdir, "rt")

    @property
    def control_socket(self) -> str:
        return os.path.join(self.runtime_dir, "supervisor.sock")

    @property
    def conf_path(self) -> str:
        return os.path.join(self.runtime_dir, "supervisord.conf")

    @property
    def deploy_path(self) -> str:
        return os.path.join(self.workdir, "deploy.toml")

    def render(self) -> str:
        s = self.spec
        env = ", ".join('%s = %s' % (k, json.dumps(v)) for k, v in sorted(self.worker_env().items()))
        lines = [
            "[app]",
            'name = "bench"',
            'wsgi = %s' % json.dumps(s.app),
            'directory = %s' % json.dumps(ROOT),
            'python = %s' % json.dumps(sys.executable),
            "environment = { %s }" % env,
            "",
            "[workers]",
            "count = %d" % s.workers,
            "standby = %d" % s.extra.get("standby", 1),
            # Only when asked for: the product's default otherwise.
            *(["warm_standby = %s" % ("true" if s.extra["warm_standby"] else "false")]
              if "warm_standby" in s.extra else []),
            "threads = %d" % s.threads,
            'socket = %s' % json.dumps("unix://" + self.socket_path),
            'graceful_timeout = "10s"',
            "",
            "[limits]",
            "max_requests = %d" % s.max_requests,
            "max_rss = %d" % s.max_rss,
            "max_rss_hard = %d" % s.extra.get("max_rss_hard", 0),
            "",
            "[recycle]",
            "check_interval = %s" % float(s.check_interval),
            "flap_window = %s" % float(s.extra.get("flap_window", 60.0)),
            "max_concurrent = %d" % s.extra.get("max_concurrent", 1),
            "",
            "[nginx]",
            "managed = false",
            "keepalive = %d" % s.keepalive,
            "",
            "[runtime]",
            'dir = %s' % json.dumps(self.runtime_dir),
            "",
        ]
        return "\n".join(lines)

    def toolkit(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "fcgi_toolkit"] + list(args) + ["-c", self.deploy_path]

    def start(self, timeout: float = 60.0) -> None:
        with open(self.deploy_path, "w") as f:
            f.write(self.render())
        out = open(os.path.join(self.workdir, "run-stdout.log"), "ab")
        env = dict(os.environ, PYTHONPATH=ROOT)
        self.proc = subprocess.Popen(self.toolkit("run"), stdout=out, stderr=out,
                                     start_new_session=True, cwd=self.workdir, env=env)
        out.close()
        try:
            self.wait_ready(timeout)
        except ContenderError:
            self.stop()
            raise

    def ready_pids(self) -> list[int]:
        # Ours has its own readiness signal: the scoreboard's ready flag.
        # Require both it and the neutral import mark.
        from fcgi_toolkit.scoreboard import Scoreboard
        pids = super().ready_pids()
        board = Scoreboard(os.path.join(self.runtime_dir, "scoreboard"), self.spec.workers
                           + self.spec.extra.get("standby", 1))
        try:
            ready = {r.pid for r in board.read_all() if r is not None and r.ready and not r.draining}
        finally:
            board.close()
        return [p for p in pids if p in ready]

    def listener_pid(self) -> Optional[int]:
        try:
            info = self.rpc().supervisor.getProcessInfo("bench_watchdog:bench_watchdog")
        except (OSError, xmlrpc.client.Error):
            return None
        return info["pid"] or None

    def reload(self) -> None:
        subprocess.run(self.toolkit("reload"), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                       timeout=120, env=dict(os.environ, PYTHONPATH=ROOT))

    def restart_one(self, index: int) -> None:
        subprocess.run(self.toolkit("recycle") + ["bench_%02d" % index], stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL, timeout=120, env=dict(os.environ, PYTHONPATH=ROOT))


def ours_available() -> Optional[str]:
    """None if our worker, listener and runner are importable, else the reason."""
    import importlib.util
    missing = [m for m in ("fcgi_toolkit.worker", "fcgi_toolkit.listener", "fcgi_toolkit.runner")
               if importlib.util.find_spec(m) is None]
    return "not built yet: %s" % ", ".join(missing) if missing else None


KINDS = {"ours": Ours, "flup": PlainSupervisord, "uwsgi": Uwsgi}


def unavailable(kind: str, spec: Spec) -> Optional[str]:
    """Why ``kind`` cannot run here (None if it can)."""
    if kind == "ours":
        return ours_available()
    if kind == "uwsgi" and not tool("uwsgi"):
        return "uwsgi is not installed (pip install uwsgi)"
    if kind == "flup" and spec.max_rss and not tool("memmon"):
        return "superlance's memmon is not installed (pip install superlance)"
    return None
