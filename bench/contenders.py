"""The contenders, each started in its own work directory on a unix socket.

- :class:`Ours`: ``fcgi-toolkit run`` (supervisord + our worker + the
  watchdog listener), nginx left to the bench (``nginx.managed = false``).
- :class:`PlainSupervisord`: what users run today: supervisord's
  ``[fcgi-program]`` with a bare flup6 ``WSGIServer`` per process, restarted
  with ``supervisorctl restart`` and capped with superlance's memmon.
- :class:`Uwsgi`: uWSGI's ``--fastcgi-socket`` with a master,
  ``--max-requests``, ``--reload-on-rss`` and chain reload; from an ini file
  with ``touch-reload`` when asked (``Spec.extra["ini"]``).
- :class:`Gunicorn`: gunicorn's arbiter and sync workers from a Python
  config file, HTTP on a unix socket (nginx proxies to it).

All take the same :class:`Spec` (app, workers, threads, limits) so one
scenario drives them alike.  Every process is started in a new session and
killed by process group on :meth:`Contender.stop`.
"""
from __future__ import annotations

import glob
import dataclasses
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
    protocol = "fastcgi"          # what nginx speaks to it: "fastcgi" or "http"
    # Whether a change of the worker count (:meth:`resize`) replaces every
    # worker (a reload) or only starts or stops the difference.
    resize_replaces_workers = True

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

    def serving_pids(self) -> list[int]:
        """The workers that take requests (ours leaves out its warm standbys)."""
        return self.worker_pids()

    def reload(self) -> None:
        """A rolling (or, for the baseline, full) restart of every worker."""
        raise NotImplementedError

    def resize(self, count: int) -> Optional[subprocess.Popen]:
        """Change the worker count of the running contender the way its users
        do (edit the config file, then trigger); returns the trigger command
        still running, if there is one (the caller waits for it)."""
        raise NotImplementedError

    # -- shared ---------------------------------------------------------
    def _launch(self, cmd: list, log_name: str, timeout: float, env: Optional[dict] = None) -> None:
        """Start ``cmd`` in a new session (output to ``log_name``) and wait
        until its workers are ready; stopped again if they never are."""
        out = open(os.path.join(self.workdir, log_name), "ab")
        self.proc = subprocess.Popen(cmd, stdout=out, stderr=out, start_new_session=True,
                                     cwd=self.workdir, env=env)
        out.close()
        try:
            self.wait_ready(timeout)
        except ContenderError:
            self.stop()
            raise

    def _respec(self, count: int) -> None:
        self.spec = dataclasses.replace(self.spec, workers=count)

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
        self._launch([tool("supervisord") or "supervisord", "-n", "-c", self.conf_path],
                     "supervisord-stdout.log", timeout)

    def restart_one(self, index: int) -> subprocess.CompletedProcess:
        """``supervisorctl restart bench:bench_NN``: what a cron job or operator does."""
        return self.supervisorctl("restart", "bench:bench_%02d" % index)

    def reload(self) -> None:
        self.supervisorctl("restart", "bench:*")


def live_children(proc: Optional[subprocess.Popen]) -> list[int]:
    """The non-zombie children of a master process (its workers)."""
    import psutil
    if proc is None or proc.poll() is not None:
        return []
    try:
        return [c.pid for c in psutil.Process(proc.pid).children()
                if c.status() != psutil.STATUS_ZOMBIE]
    except psutil.Error:
        return []


class Uwsgi(Contender):
    """uWSGI master + N workers on ``--fastcgi-socket``.

    ``Spec.extra``: ``lazy_apps`` (default on: each worker imports the app,
    needed for a chain reload), ``ini`` (the options go to ``uwsgi.ini`` with
    ``touch-reload``, so :meth:`resize` edits the file and touches the
    trigger: uWSGI's graceful reload re-reads it)."""
    kind = "uwsgi"

    def __init__(self, workdir: str, spec: Spec, label: str = ""):
        super().__init__(workdir, spec, label)
        self.fifo = os.path.join(workdir, "master.fifo")
        self.ini_path = os.path.join(workdir, "uwsgi.ini")
        self.touch_path = os.path.join(workdir, "reload.trigger")     # touch-reload's file

    @property
    def lazy_apps(self) -> bool:
        return bool(self.spec.extra.get("lazy_apps", True))

    def options(self) -> list[tuple[str, Optional[str]]]:
        """uWSGI's options as (name, value); value None for a flag."""
        s = self.spec
        opts: list[tuple[str, Optional[str]]] = [
            ("master", None), ("fastcgi-socket", self.socket_path), ("chmod-socket", "600"),
            ("processes", str(s.workers)), ("module", s.app), ("chdir", ROOT), ("pythonpath", ROOT),
            ("die-on-term", None), ("disable-logging", None), ("master-fifo", self.fifo),
            ("pidfile", os.path.join(self.workdir, "uwsgi.pid")),
            ("logto", os.path.join(self.workdir, "uwsgi.log")), ("listen", "128")]
        if self.lazy_apps:
            opts.append(("lazy-apps", None))
        # uWSGI ignores --max-requests and --reload-on-rss for a worker
        # younger than min-worker-lifetime (default 10 s); ours has no
        # such floor for request counts, and its RSS flap guard is
        # lowered the same way (Spec.extra["flap_window"]).
        # Spec.extra["min_worker_lifetime"] = None: uWSGI's default.
        if s.extra.get("min_worker_lifetime", 1) is not None:
            opts.append(("min-worker-lifetime", str(s.extra.get("min_worker_lifetime", 1))))
        if s.threads > 1:
            opts.append(("threads", str(s.threads)))
        if s.max_requests:
            opts.append(("max-requests", str(s.max_requests)))
        if s.max_rss:
            opts.append(("reload-on-rss", str(max(1, s.max_rss // (1024 * 1024)))))
        opts += [("env", "%s=%s" % kv) for kv in sorted(self.worker_env().items())]
        if s.extra.get("ini"):
            opts.append(("touch-reload", self.touch_path))
        return opts

    def render_ini(self) -> str:
        return "[uwsgi]\n" + "".join("%s = %s\n" % (k, "true" if v is None else v)
                                     for k, v in self.options())

    def command(self) -> list[str]:
        binary = tool("uwsgi")
        if not binary:
            raise ContenderError("uwsgi is not installed (pip install uwsgi)")
        if self.spec.extra.get("ini"):
            return [binary, "--ini", self.ini_path]
        return [binary] + ["--" + k if v is None else "--%s=%s" % (k, v) for k, v in self.options()]

    def start(self, timeout: float = 60.0) -> None:
        if self.spec.extra.get("ini"):
            with open(self.touch_path, "w"):
                pass
            with open(self.ini_path, "w") as f:
                f.write(self.render_ini())
        self._launch(self.command(), "uwsgi-stdout.log", timeout)

    def worker_pids(self) -> list[int]:
        return live_children(self.proc)

    def ready_pids(self) -> list[int]:
        if self.lazy_apps:
            return super().ready_pids()
        # Without --lazy-apps the master imports the app and forks the
        # workers from it (again after a reload): every worker has it.
        master = self.proc.pid if self.proc is not None else 0
        loaded = os.path.exists(os.path.join(self.mark_dir, "ready-%d" % master))
        return self.worker_pids() if loaded else []

    def _fifo(self, command: bytes) -> None:
        fd = os.open(self.fifo, os.O_WRONLY | os.O_NONBLOCK)
        try:
            os.write(fd, command)
        finally:
            os.close(fd)

    def reload(self) -> None:
        """Chain reload: one worker at a time (needs --lazy-apps)."""
        self._fifo(b"c")

    def resize(self, count: int) -> None:
        """``processes`` changed in the ini, then the touch-reload file touched:
        a graceful reload of the whole instance (the master re-reads the ini)."""
        self._respec(count)
        with open(self.ini_path, "w") as f:
            f.write(self.render_ini())
        os.utime(self.touch_path)

    def _graceful_stop(self) -> None:
        self.proc.send_signal(signal.SIGINT)


class Gunicorn(Contender):
    """gunicorn's arbiter + N sync workers on a unix socket, from a Python
    config file; nginx proxies HTTP to it (no FastCGI in gunicorn)."""
    kind = "gunicorn"
    protocol = "http"

    @property
    def conf_path(self) -> str:
        return os.path.join(self.workdir, "gunicorn.conf.py")

    def render(self) -> str:
        s = self.spec
        settings = [("wsgi_app", s.app), ("bind", ["unix:" + self.socket_path]), ("umask", 0o077),
                    ("workers", s.workers), ("threads", s.threads), ("chdir", ROOT),
                    ("graceful_timeout", 10), ("max_requests", s.max_requests),
                    ("pidfile", os.path.join(self.workdir, "gunicorn.pid")),
                    ("errorlog", os.path.join(self.workdir, "gunicorn.log")),
                    # gunicorn >= 25.1 opens a control socket under $HOME by default.
                    ("control_socket_disable", True)]
        return "".join("%s = %r\n" % kv for kv in settings)

    def start(self, timeout: float = 60.0) -> None:
        binary = tool("gunicorn")
        if not binary:
            raise ContenderError("gunicorn is not installed (pip install gunicorn)")
        with open(self.conf_path, "w") as f:
            f.write(self.render())
        self._launch([binary, "-c", self.conf_path], "gunicorn-stdout.log", timeout,
                     env=dict(os.environ, **self.worker_env()))

    def worker_pids(self) -> list[int]:
        return live_children(self.proc)

    def reload(self) -> None:
        """HUP: new workers with the re-read config, the old ones stopped gracefully."""
        self.proc.send_signal(signal.SIGHUP)

    def resize(self, count: int) -> None:
        """``workers`` changed in the config file, then HUP to the master."""
        self._respec(count)
        with open(self.conf_path, "w") as f:
            f.write(self.render())
        self.reload()


class Ours(_Supervised):
    """fcgi-toolkit: supervisord, our worker and the watchdog, from a deploy.toml."""
    kind = "fcgi-toolkit"
    resize_replaces_workers = False     # apply starts or stops only the difference

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
            # Only when asked for: the product's defaults otherwise.
            *self._asked("standby", "max_slots", "warm_standby"),
            "threads = %d" % s.threads,
            'socket = %s' % json.dumps("unix://" + self.socket_path),
            'graceful_timeout = "10s"',
            "",
            "[limits]",
            "max_requests = %d" % s.max_requests,
            "max_rss = %d" % s.max_rss,
            *self._asked("max_rss_hard"),
            "",
            "[recycle]",
            "check_interval = %s" % float(s.check_interval),
            *self._asked("flap_window", "max_concurrent"),
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

    def _asked(self, *keys: str) -> list[str]:
        """``key = value`` lines for the keys a scenario set in ``Spec.extra``."""
        return ["%s = %s" % (k, json.dumps(self.spec.extra[k])) for k in keys if k in self.spec.extra]

    def toolkit(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "fcgi_toolkit"] + list(args) + ["-c", self.deploy_path]

    def start(self, timeout: float = 60.0) -> None:
        from fcgi_toolkit import settings
        with open(self.deploy_path, "w") as f:
            f.write(self.render())
        # The group's slots as `run` renders them now; a later resize stays
        # within them (workers.max_slots), so the scoreboard keeps its size.
        self.slot_count = settings.load(self.deploy_path).slots
        self._launch(self.toolkit("run"), "run-stdout.log", timeout, env=dict(os.environ, PYTHONPATH=ROOT))

    def _slots(self) -> list:
        from fcgi_toolkit.scoreboard import Scoreboard
        board = Scoreboard(os.path.join(self.runtime_dir, "scoreboard"), self.slot_count)
        try:
            return [r for r in board.read_all() if r is not None]
        finally:
            board.close()

    def ready_pids(self) -> list[int]:
        # Ours has its own readiness signal: the scoreboard's ready flag.
        # Require both it and the neutral import mark.
        pids = super().ready_pids()
        ready = {r.pid for r in self._slots() if r.ready and not r.draining}
        return [p for p in pids if p in ready]

    def serving_pids(self) -> list[int]:
        standby = {r.pid for r in self._slots() if r.standby}
        return [p for p in self.worker_pids() if p not in standby]

    def listener_pid(self) -> Optional[int]:
        try:
            info = self.rpc().supervisor.getProcessInfo("bench_watchdog:bench_watchdog")
        except (OSError, xmlrpc.client.Error):
            return None
        return info["pid"] or None

    def reload(self) -> None:
        subprocess.run(self.toolkit("reload"), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                       timeout=120, env=dict(os.environ, PYTHONPATH=ROOT))

    def resize(self, count: int) -> subprocess.Popen:
        """``workers.count`` changed in deploy.toml, then ``fcgi-toolkit apply``
        (within ``workers.max_slots``: no group restart)."""
        self._respec(count)
        with open(self.deploy_path, "w") as f:
            f.write(self.render())
        out = open(os.path.join(self.workdir, "apply.log"), "ab")
        try:
            return subprocess.Popen(self.toolkit("apply"), stdout=out, stderr=subprocess.STDOUT,
                                    env=dict(os.environ, PYTHONPATH=ROOT))
        finally:
            out.close()

    def restart_one(self, index: int) -> None:
        subprocess.run(self.toolkit("recycle") + ["bench_%02d" % index], stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL, timeout=120, env=dict(os.environ, PYTHONPATH=ROOT))


def ours_available() -> Optional[str]:
    """None if our worker, listener and runner are importable, else the reason."""
    import importlib.util
    missing = [m for m in ("fcgi_toolkit.worker", "fcgi_toolkit.listener", "fcgi_toolkit.runner")
               if importlib.util.find_spec(m) is None]
    return "not built yet: %s" % ", ".join(missing) if missing else None


KINDS = {"ours": Ours, "flup": PlainSupervisord, "uwsgi": Uwsgi, "gunicorn": Gunicorn}


def unavailable(kind: str, spec: Spec) -> Optional[str]:
    """Why ``kind`` cannot run here (None if it can)."""
    if kind == "ours":
        return ours_available()
    if kind in ("uwsgi", "gunicorn") and not tool(kind):
        return "%s is not installed (pip install %s)" % (kind, kind)
    if kind == "flup" and spec.max_rss and not tool("memmon"):
        return "superlance's memmon is not installed (pip install superlance)"
    return None
