"""Integration harness: a real supervisord, real workers and a real nginx.

Usage (the ``cluster`` fixture in conftest.py wraps this)::

    with Cluster(tmp_path, "core_app:application",
                 workers={"count": 2}, limits={"max_requests": 50}) as c:
        assert c.get("/").status == 200
        c.ctl("status")

A Cluster writes ``deploy.toml`` (sections merged from the keyword
arguments over the harness defaults), renders it with fcgi_toolkit.render,
starts ``supervisord -n`` in its own session, and waits (bounded) until the
watchdog listener has ``workers.count`` workers RUNNING whose scoreboard
slots say ready, and nginx accepts (and, with warm standbys, the
``workers.standby`` standbys say so in their slots: the steady state).  ``stop()`` (also on ``__exit__`` and
on a failed start) shuts supervisord down, waits, then kills every process
it started that is still alive, and removes the runtime dir.

Apps: ``app`` is ``module:callable``.  ``app_dir`` defaults to tests/apps
(so ``"core_app:application"``), or to the repository root when the module
starts with ``tests.`` (so ``"tests.apps.core_app:application"`` works too).

Logs stay in ``<base>/log`` after the test (supervisord.log, NAME_00.log,
NAME_watchdog.log, nginx-error.log, nginx-access.log).  The runtime dir
(sockets, pid files, scoreboard) is a short directory under /tmp because a
unix socket path is limited to about 100 bytes.
"""
from __future__ import annotations

import collections
import http.client
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import xmlrpc.client
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping, Optional

import psutil

from fcgi_toolkit import render, scoreboard, settings
from supervisor.states import ProcessStates
from supervisor.xmlrpc import SupervisorTransport

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
REPO_ROOT = os.path.dirname(TESTS_DIR)
APPS_DIR = os.path.join(TESTS_DIR, "apps")

#: Settings every test cluster starts from; keyword sections override them key by key.
DEFAULTS: dict[str, dict[str, Any]] = {
    "workers": {"count": 2, "standby": 1, "graceful_timeout": "10s"},
    "nginx": {"managed": True, "read_timeout": "60s"},
}


def nginx_available() -> bool:
    return bool(render.find_nginx())


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago (bind to port 0)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def port_open(port: int, host: str = "127.0.0.1", timeout: float = 1.0) -> bool:
    """Whether something accepts TCP connections on host:port now."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def toml_dumps(data: Mapping[str, Mapping[str, Any]]) -> str:
    """A small TOML writer for deploy files: tables of scalars, lists, inline tables."""
    def value(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, (int, float)):
            return repr(v)
        if isinstance(v, str):
            return json.dumps(v)  # JSON string escapes are valid TOML basic strings
        if isinstance(v, (list, tuple)):
            return "[" + ", ".join(value(x) for x in v) + "]"
        if isinstance(v, Mapping):
            return "{ " + ", ".join("%s = %s" % (json.dumps(k), value(x)) for k, x in v.items()) + " }"
        raise TypeError("cannot write %r as TOML" % (v,))

    out = []
    for section, table in data.items():
        out.append("[%s]" % section)
        out.extend("%s = %s" % (key, value(v)) for key, v in table.items())
        out.append("")
    return "\n".join(out)


def venv_with_this_env(env_dir: str, before_pth: Callable[[str], None] = lambda python: None) -> str:
    """A new venv in ``env_dir`` that imports the running interpreter's packages; its python.

    No --system-site-packages: inside tox, sys.executable is a venv, and a
    venv made from it sees the *base* interpreter's packages, which on a
    fresh machine hold none of our dependencies.  The new venv gets the
    running interpreter's own site-packages (where tox installed the
    dependencies) explicitly, through a .pth file: those directories come
    after the venv's own site-packages on sys.path.  ``before_pth(python)``
    runs before the .pth exists (pip would otherwise find tox's copies
    "already installed")."""
    import site
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", env_dir], check=True,
                   stdin=subprocess.DEVNULL, capture_output=True, timeout=120)
    python = os.path.join(env_dir, "bin", "python")
    before_pth(python)
    own = subprocess.run([python, "-c", "import site; print(site.getsitepackages()[0])"],
                         check=True, capture_output=True, text=True, timeout=60).stdout.strip()
    with open(os.path.join(own, "_test_deps.pth"), "w", encoding="utf-8") as f:
        f.write("\n".join(site.getsitepackages()) + "\n")
    return python


def kill_all(processes: Iterable["psutil.Process"], timeout: float) -> None:
    """SIGKILL every process still running (a reused pid is left alone), then reap them."""
    processes = list(processes)
    for p in processes:
        try:
            if p.is_running():
                p.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(processes, timeout=timeout)


def log_tails(log_dir: str, tail: int) -> str:
    """The last ``tail`` lines of every file under ``log_dir``, for failure messages."""
    parts = []
    for root, _, files in os.walk(log_dir):
        for filename in sorted(files):
            path = os.path.join(root, filename)
            with open(path, errors="replace") as f:
                lines = f.read().splitlines()[-tail:]
            parts.append("----- %s -----\n%s" % (os.path.relpath(path, log_dir), "\n".join(lines)))
    return "\n".join(parts)


def print_logs_if_failed(request: Any, title: str, logs: Callable[[], str]) -> None:
    """In a fixture's teardown: print ``logs()`` when the test's call failed."""
    rep = getattr(request.node, "rep_call", None)
    if rep is not None and rep.failed:
        print("\n===== %s =====\n%s" % (title, logs()))


def wait_for(predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.1) -> Any:
    """Poll ``predicate`` until it returns a true value; raise TimeoutError naming ``what``."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() > deadline:
            raise TimeoutError("timed out after %.0f s waiting for %s" % (timeout, what))
        time.sleep(interval)


@dataclass
class Response:
    status: int
    reason: str
    headers: dict  # lower-case names
    body: bytes

    @property
    def text(self) -> str:
        return self.body.decode("utf-8", "replace")


def http_request(host: str, port: int, method: str, path: str, body: Optional[bytes] = None,
                 headers: Optional[Mapping[str, str]] = None, timeout: float = 30.0) -> Response:
    """One HTTP request on a new connection; raises OSError/HTTPException on transport failure."""
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request(method, path, body=body, headers=dict(headers or {}))
        resp = conn.getresponse()
        data = resp.read()
        return Response(resp.status, resp.reason, {k.lower(): v for k, v in resp.getheaders()}, data)
    finally:
        conn.close()


class LoadGenerator:
    """Bounded background HTTP load: ``threads`` clients until ``duration`` or ``count``.

    Records every status code and exception.  ``failed`` counts exceptions
    and statuses outside ``ok``.  Always bounded: duration defaults to 30 s.
    """

    def __init__(self, host: str, port: int, path: str = "/", *, threads: int = 4,
                 duration: Optional[float] = None, count: Optional[int] = None,
                 method: str = "GET", body: Optional[bytes] = None, timeout: float = 30.0,
                 ok: Iterable[int] = (200,), pause: float = 0.0):
        self.host, self.port, self.path = host, port, path
        self.threads = threads
        self.duration = 30.0 if duration is None and count is None else duration
        self.count = count
        self.method, self.body, self.timeout = method, body, timeout
        self.ok = frozenset(ok)
        self.pause = pause
        self.statuses: collections.Counter = collections.Counter()
        self.errors: list[str] = []
        self.bodies_by_status: dict[int, bytes] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._issued = 0
        self._threads: list[threading.Thread] = []

    @property
    def total(self) -> int:
        with self._lock:
            return sum(self.statuses.values()) + len(self.errors)

    @property
    def failed(self) -> int:
        with self._lock:
            return len(self.errors) + sum(n for s, n in self.statuses.items() if s not in self.ok)

    def _take(self) -> bool:
        with self._lock:
            if self.count is not None and self._issued >= self.count:
                return False
            self._issued += 1
            return True

    def _client(self, deadline: Optional[float]) -> None:
        while not self._stop.is_set() and (deadline is None or time.monotonic() < deadline):
            if not self._take():
                return
            try:
                r = http_request(self.host, self.port, self.method, self.path, self.body,
                                 timeout=self.timeout)
                with self._lock:
                    self.statuses[r.status] += 1
                    self.bodies_by_status.setdefault(r.status, r.body[:2000])
            except (OSError, http.client.HTTPException) as exc:
                with self._lock:
                    self.errors.append("%s: %s" % (type(exc).__name__, exc))
            if self.pause:
                time.sleep(self.pause)

    def start(self) -> "LoadGenerator":
        deadline = time.monotonic() + self.duration if self.duration is not None else None
        for i in range(self.threads):
            t = threading.Thread(target=self._client, args=(deadline,), name="load-%d" % i, daemon=True)
            t.start()
            self._threads.append(t)
        return self

    def stop(self) -> None:
        self._stop.set()

    def join(self, timeout: Optional[float] = None) -> None:
        """Wait for the clients (bounded: duration + request timeout by default)."""
        limit = timeout if timeout is not None else (self.duration or 0) + self.timeout + 5
        end = time.monotonic() + limit
        for t in self._threads:
            t.join(max(0.0, end - time.monotonic()))
        if any(t.is_alive() for t in self._threads):
            self.stop()
            raise TimeoutError("load generator did not finish within %.0f s" % limit)

    def __enter__(self) -> "LoadGenerator":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
        self.join()

    def summary(self) -> str:
        return "statuses=%s errors=%d%s" % (dict(self.statuses), len(self.errors),
                                            (" first error: " + self.errors[0]) if self.errors else "")


def _merge(defaults: Mapping[str, Mapping[str, Any]], overrides: Mapping[str, Mapping[str, Any]]) -> dict:
    out = {section: dict(table) for section, table in defaults.items()}
    for section, table in overrides.items():
        out.setdefault(section, {}).update(table)
    return out


class Cluster:
    """A running deployment: supervisord + workers + watchdog (+ nginx)."""

    def __init__(self, base_dir, app: str = "core_app:application", /, *, name: str = "core",
                 app_dir: Optional[str] = None, ready_timeout: float = 60.0,
                 wait_ready: bool = True, steady: bool = True, **sections: Mapping[str, Any]):
        self.base_dir = os.path.abspath(str(base_dir))
        self.ready_timeout = ready_timeout
        self.wait_ready_on_start = wait_ready
        # steady=False: start() waits for the serving workers only, not for the
        # warm standbys too (an app whose standbys are promoted as soon as they wait).
        self.wait_steady_on_start = steady
        if app_dir is None:
            app_dir = REPO_ROOT if app.startswith("tests.") else APPS_DIR
        os.makedirs(self.base_dir, exist_ok=True)
        self.log_dir = os.path.join(self.base_dir, "log")
        # Short: unix socket paths are limited to ~100 bytes.
        self.runtime_dir = tempfile.mkdtemp(prefix="fct-")
        # nginx started by root runs its workers unprivileged: they must reach the socket.
        os.chmod(self.runtime_dir, 0o755)
        self.port = free_port()
        config = _merge(DEFAULTS, sections)
        config["nginx"].setdefault("listen", "127.0.0.1:%d" % self.port)
        if config["nginx"]["listen"] != "127.0.0.1:%d" % self.port:
            host, _, port = config["nginx"]["listen"].rpartition(":")
            self.port = int(port)
        config.setdefault("app", {})
        config["app"] = {"name": name, "wsgi": app, "directory": app_dir, **config["app"]}
        config.setdefault("runtime", {})
        config["runtime"] = {"dir": self.runtime_dir, "log_dir": self.log_dir, **config["runtime"]}
        self.config = config
        self.deploy_path = os.path.join(self.base_dir, "deploy.toml")
        with open(self.deploy_path, "w", encoding="utf-8") as f:
            f.write(toml_dumps(config))
        self.dep = settings.load(self.deploy_path)
        self.name = self.dep.name
        self.conf = self.dep.supervisord_conf
        self.proc: Optional[subprocess.Popen] = None
        self._known: dict[int, psutil.Process] = {}
        self._stopped = False

    # -- lifecycle --------------------------------------------------------
    def start(self) -> "Cluster":
        from fcgi_toolkit import runner

        with open(self.deploy_path, "rb") as f:
            runner.prepare_run(self.dep, f.read())     # as run: the processes read applied.toml
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self._out = open(os.path.join(self.log_dir, "supervisord.stdout"), "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "supervisor.supervisord", "-n", "-c", self.conf],
            stdin=subprocess.DEVNULL, stdout=self._out, stderr=subprocess.STDOUT,
            env=env, start_new_session=True)
        try:
            wait_for(self._rpc_up, 20, "supervisord's control socket")
            if self.wait_ready_on_start:
                self.wait_ready()
                if (self.wait_steady_on_start and self.dep.workers.warm_standby
                        and self.dep.workers.standby):
                    self.wait_warm()
        except BaseException:
            self.stop()
            raise
        return self

    def _rpc_up(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise RuntimeError("supervisord exited with %s:\n%s" % (self.proc.returncode, self.diagnostics()))
        try:
            return self.rpc.supervisor.getState()["statename"] == "RUNNING"
        except (OSError, xmlrpc.client.Fault, http.client.HTTPException):
            return False

    def ready_workers(self, starting: bool = False) -> dict[str, int]:
        """{slot name: pid} of RUNNING workers whose live scoreboard slot says ready.

        ``starting``: also those supervisord still calls STARTING (within
        startsecs) whose slot says ready: they accept, and the watchdog counts
        them as a ready replacement (``fcgi_toolkit.recycle.ready_early``)."""
        states = (ProcessStates.RUNNING, ProcessStates.STARTING) if starting else (
            ProcessStates.RUNNING,)
        self._remember()
        return self._workers_whose_slot(states, lambda rec: rec.ready)

    def warm_workers(self) -> dict[str, int]:
        """{slot name: pid} of warm standbys: running (or within startsecs), the
        app imported, their live scoreboard slot says standby (they accept nothing)."""
        return self._workers_whose_slot((ProcessStates.RUNNING, ProcessStates.STARTING),
                                        lambda rec: rec.standby)

    def _workers_whose_slot(self, states: tuple, says: Callable[[Any], bool]) -> dict[str, int]:
        """{slot name: pid} of workers in ``states`` whose live, not draining
        scoreboard slot ``says`` so."""
        board = scoreboard.Scoreboard(self.dep.scoreboard_path, self.dep.slots)
        try:
            out = {}
            for i, slot in enumerate(self.dep.slot_names()):
                info = self._infos().get(slot)
                if not info or info["state"] not in states:
                    continue
                rec = board.read(i)
                if rec and says(rec) and not rec.draining and rec.pid == info["pid"]:
                    out[slot] = info["pid"]
            return out
        finally:
            board.close()

    def wait_warm(self, count: Optional[int] = None, timeout: Optional[float] = None) -> dict[str, int]:
        """Wait until ``count`` (default workers.standby) warm standbys wait."""
        count = self.dep.workers.standby if count is None else count

        def warm():
            workers = self.warm_workers()
            return workers if len(workers) >= count else None

        return wait_for(warm, self.ready_timeout if timeout is None else timeout,
                        "%d warm standby workers" % count)

    def wait_ready(self, count: Optional[int] = None, timeout: Optional[float] = None) -> dict[str, int]:
        """Wait until ``count`` (default workers.count) workers are ready and nginx accepts."""
        count = self.dep.workers.count if count is None else count
        timeout = self.ready_timeout if timeout is None else timeout

        def ready():
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError("supervisord exited with %s:\n%s" % (self.proc.returncode, self.diagnostics()))
            workers = self.ready_workers()
            return workers if len(workers) >= count and self._nginx_up() else None

        try:
            return wait_for(ready, timeout, "%d ready workers and nginx" % count)
        except TimeoutError as exc:
            raise TimeoutError("%s\n%s" % (exc, self.diagnostics())) from None

    def _nginx_up(self) -> bool:
        if not self.dep.nginx.managed:
            return True
        return port_open(self.port)

    def _remember(self) -> None:
        """Record every descendant of supervisord so that stop() can kill leftovers."""
        if self.proc is None:
            return
        try:
            for p in psutil.Process(self.proc.pid).children(recursive=True):
                self._known.setdefault(p.pid, p)
        except psutil.Error:
            pass

    def stop(self, timeout: float = 60.0) -> None:
        """Shut everything down; idempotent; kills leftovers even after a failure."""
        if self._stopped:
            return
        self._stopped = True
        try:
            if self.proc is not None:
                self._remember()
                if self.proc.poll() is None:
                    self.proc.send_signal(signal.SIGTERM)
                    try:
                        self.proc.wait(timeout)
                    except subprocess.TimeoutExpired:
                        self._remember()
                        self.proc.kill()
                        self.proc.wait(10)
                kill_all(self._known.values(), timeout=5)
        finally:
            if getattr(self, "_out", None):
                self._out.close()
            shutil.rmtree(self.runtime_dir, ignore_errors=True)

    def __enter__(self) -> "Cluster":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- supervisord ------------------------------------------------------
    @property
    def rpc(self) -> xmlrpc.client.ServerProxy:
        """A fresh XML-RPC proxy on the private unix control socket."""
        return xmlrpc.client.ServerProxy(
            "http://127.0.0.1",
            transport=SupervisorTransport(None, None, "unix://" + self.dep.control_socket))

    def _infos(self) -> dict[str, dict]:
        return {i["name"]: i for i in self.rpc.supervisor.getAllProcessInfo()
                if i["group"] == self.dep.group}

    def edit(self, **sections: Mapping[str, Any]) -> None:
        """Change the deployment file (section -> keys to set), as an operator would."""
        for section, table in sections.items():
            self.config.setdefault(section, {}).update(table)
        with open(self.deploy_path, "w", encoding="utf-8") as f:
            f.write(toml_dumps(self.config))

    def status_json(self) -> dict:
        """``fcgi-toolkit status --json``'s object."""
        r = self.toolkit("status", "-c", self.deploy_path, "--json", timeout=30)
        assert r.returncode == 0, r.stdout + r.stderr
        return json.loads(r.stdout)

    def follow_generation(self) -> None:
        """Look at the serving generation's group from now on (after ``apply`` switched it)."""
        from fcgi_toolkit import generations
        self.dep = generations.load(self.deploy_path)

    def process_info(self) -> dict[str, dict]:
        """{slot name: supervisord process info} for the worker group."""
        return self._infos()

    def pids(self) -> dict[str, int]:
        """{slot name: pid} of RUNNING workers (serving ones and warm standbys)."""
        self._remember()
        return {n: i["pid"] for n, i in self._infos().items() if i["state"] == ProcessStates.RUNNING}

    def ctl(self, *args: str, timeout: float = 60.0, check: bool = False) -> str:
        """Run ``supervisorctl -c CONF ARGS``; return stdout+stderr as text."""
        r = subprocess.run([sys.executable, "-m", "supervisor.supervisorctl", "-c", self.conf, *args],
                           stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                           timeout=timeout)
        self._remember()
        if check and r.returncode != 0:
            raise AssertionError("supervisorctl %s exited %d:\n%s" % (" ".join(args), r.returncode,
                                                                       r.stdout.decode()))
        return r.stdout.decode("utf-8", "replace")

    def toolkit(self, *args: str, timeout: float = 60.0) -> subprocess.CompletedProcess:
        """Run ``python -m fcgi_toolkit ARGS`` (text output, not checked)."""
        return subprocess.run([sys.executable, "-m", "fcgi_toolkit", *args], stdin=subprocess.DEVNULL,
                              capture_output=True, text=True, timeout=timeout)

    # -- scoreboard and logs ---------------------------------------------
    def scoreboard(self) -> list[Optional[scoreboard.SlotRecord]]:
        board = scoreboard.Scoreboard(self.dep.scoreboard_path, self.dep.slots)
        try:
            return board.read_all()
        finally:
            board.close()

    def log(self, filename: str) -> str:
        try:
            with open(os.path.join(self.log_dir, filename), encoding="utf-8", errors="replace") as f:
                return f.read()
        except FileNotFoundError:
            return ""

    def worker_log(self, slot: str) -> str:
        return self.log(slot + ".log")

    def watchdog_log(self) -> str:
        return self.log(self.name + "_watchdog.log")

    def supervisord_log(self) -> str:
        return self.log("supervisord.log")

    def nginx_error_log(self) -> str:
        return self.log("nginx-error.log")

    def access_log_statuses(self) -> collections.Counter:
        """Status codes in nginx's access log (combined format)."""
        statuses: collections.Counter = collections.Counter()
        for line in self.log("nginx-access.log").splitlines():
            m = re.search(r'" (\d{3}) ', line)
            if m:
                statuses[int(m.group(1))] += 1
        return statuses

    def diagnostics(self, tail: int = 40) -> str:
        """Tails of every log, for failure messages."""
        parts = []
        names = sorted(os.listdir(self.log_dir)) if os.path.isdir(self.log_dir) else []
        for filename in names:
            lines = self.log(filename).splitlines()[-tail:]
            parts.append("----- %s -----\n%s" % (filename, "\n".join(lines)))
        return "\n".join(parts)

    # -- HTTP -------------------------------------------------------------
    def url(self, path: str = "/") -> str:
        return "http://127.0.0.1:%d%s" % (self.port, path)

    def request(self, method: str, path: str, body: Optional[bytes] = None,
                headers: Optional[Mapping[str, str]] = None, timeout: float = 30.0) -> Response:
        return http_request("127.0.0.1", self.port, method, path, body, headers, timeout)

    def get(self, path: str = "/", headers: Optional[Mapping[str, str]] = None,
            timeout: float = 30.0) -> Response:
        return self.request("GET", path, None, headers, timeout)

    def post(self, path: str, body: bytes, headers: Optional[Mapping[str, str]] = None,
             timeout: float = 30.0) -> Response:
        return self.request("POST", path, body, headers, timeout)

    def load(self, path: str = "/", **kwargs: Any) -> LoadGenerator:
        """A (not yet started) bounded load generator against this cluster's nginx."""
        return LoadGenerator("127.0.0.1", self.port, path, **kwargs)
