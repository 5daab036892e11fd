"""Tier 3: issue #6 end to end on loopback — three "hosts" (separate
supervisords with their workers bound to 127.0.0.2, 127.0.0.3, 127.0.0.4),
one nginx on 127.0.0.1 with the generated multi-host site.

* Stopping a host's supervisord (gracefully, or killing it and every process
  it started) under continuous GET load loses no GET request.
* A POST that was in flight on the killed host gets nginx's 502 at once, not
  after the request would have finished and not never; POSTs on the other
  hosts complete normally.
* A host started again returns to rotation.
* A FastCGI connection to a worker socket from an address outside
  nginx.web_servers is closed unanswered; from 127.0.0.1 it is served.
* ``fcgi-toolkit status`` on the web server (the front view) asks every
  host's supervisord over its TCP control port (control.inet_port on the
  host's own address, with credentials) and lists every host's workers.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import xmlrpc.client
from typing import Optional

import psutil
import pytest

import fcgiclient
from conftest import requires_nginx
from harness import (APPS_DIR, LoadGenerator, free_port, http_request, kill_all, log_tails,
                     port_open, print_logs_if_failed, wait_for)
from fcgi_toolkit import status as status_mod
from fcgi_toolkit import render, runner, scoreboard, settings
from supervisor.states import ProcessStates
from supervisor.xmlrpc import SupervisorTransport

pytestmark = [pytest.mark.integration, requires_nginx]

HOST_IPS = {"web1": "127.0.0.2", "web2": "127.0.0.3", "web3": "127.0.0.4"}
FAIL_TIMEOUT = "2s"


CONTROL_USER, CONTROL_PASSWORD = "ops", "mh-s3cret"


def deploy_toml(runtime_dir: str, log_dir: str, port: int, ports: dict, control_port: int) -> str:
    lines = [
        "[app]", 'name = "mh"', 'wsgi = "core_app:application"', 'directory = "%s"' % APPS_DIR,
        "[workers]", "count = 1", "standby = 1", "threads = 6", 'graceful_timeout = "10s"',
        "[nginx]", 'listen = "127.0.0.1:%d"' % port, 'web_servers = ["127.0.0.1"]',
        'connect_timeout = "1s"', 'read_timeout = "30s"',
        "[runtime]", 'dir = "%s"' % runtime_dir, 'log_dir = "%s"' % log_dir,
        "[control]", 'inet_port = "%d"' % control_port, 'username = "%s"' % CONTROL_USER,
        'password = "%s"' % CONTROL_PASSWORD,
    ]
    for name, ip in HOST_IPS.items():
        lines += ["[[hosts]]", 'name = "%s"' % name, 'address = "%s:%d"' % (ip, ports[name]),
                  'fail_timeout = "%s"' % FAIL_TIMEOUT]
    return "\n".join(lines) + "\n"


class HostSupervisor:
    """One host: its own supervisord started from its rendered supervisord.conf."""

    def __init__(self, dep: settings.Deployment):
        self.dep = dep
        self.name = dep.host.name
        self.proc: Optional[subprocess.Popen] = None
        self._known: dict[int, psutil.Process] = {}

    def start(self) -> None:
        runner.prepare(self.dep)
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        env.pop(settings.HOST_ENV, None)   # the conf sets it for every child
        self._out = open(os.path.join(self.dep.log_dir, "supervisord.stdout"), "ab")
        self.proc = subprocess.Popen(runner.supervisord_command(self.dep), stdin=subprocess.DEVNULL,
                                     stdout=self._out, stderr=subprocess.STDOUT, env=env,
                                     start_new_session=True)

    @property
    def rpc(self) -> xmlrpc.client.ServerProxy:
        return xmlrpc.client.ServerProxy(
            "http://127.0.0.1", transport=SupervisorTransport(None, None, "unix://" + self.dep.control_socket))

    def _remember(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        try:
            for p in [psutil.Process(self.proc.pid)] + psutil.Process(self.proc.pid).children(recursive=True):
                self._known.setdefault(p.pid, p)
        except psutil.Error:
            pass

    def ready_pids(self) -> set[int]:
        """Pids of RUNNING workers whose scoreboard slot says ready."""
        if self.proc is None or self.proc.poll() is not None:
            raise RuntimeError("supervisord of %s exited: %s" % (self.name, self.proc and self.proc.returncode))
        self._remember()
        try:
            infos = {i["name"]: i for i in self.rpc.supervisor.getAllProcessInfo() if i["group"] == "mh"}
        except (OSError, xmlrpc.client.Fault):
            return set()
        board = scoreboard.Scoreboard(self.dep.scoreboard_path, self.dep.slots)
        try:
            out = set()
            for i, slot in enumerate(self.dep.slot_names()):
                info, rec = infos.get(slot), board.read(i)
                if info and info["state"] == ProcessStates.RUNNING and rec and rec.ready \
                        and not rec.draining and rec.pid == info["pid"]:
                    out.add(info["pid"])
            return out
        finally:
            board.close()

    def wait_ready(self, timeout: float = 60.0) -> set[int]:
        return wait_for(lambda: len(self.ready_pids()) >= self.dep.workers.count and self.ready_pids(),
                        timeout, "host %s ready" % self.name)

    def inflight(self) -> list:
        board = scoreboard.Scoreboard(self.dep.scoreboard_path, self.dep.slots)
        try:
            return [r for r in board.read_all() if r is not None and r.inflight]
        finally:
            board.close()

    def stop(self, timeout: float = 40.0) -> None:
        """Graceful: SIGTERM to supervisord, which drains its workers."""
        if self.proc is None:
            return
        self._remember()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        self.kill()

    def kill(self) -> None:
        """Hard: SIGKILL supervisord and every process it started (a crashed host)."""
        if self.proc is None:
            return
        self._remember()
        kill_all(self._known.values(), timeout=10)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:  # pragma: no cover - SIGKILL was sent
            pass
        self._known.clear()
        self._out.close()
        self.proc = None


class MultiHost:
    """Three host supervisords and one nginx, all on loopback."""

    def __init__(self, base: str):
        self.base = base
        self.runtime_dir = tempfile.mkdtemp(prefix="fct-mh-")
        os.chmod(self.runtime_dir, 0o755)   # nginx's unprivileged workers write body temp files here
        self.log_dir = os.path.join(base, "log")
        self.port = free_port()
        ports = {name: free_port(ip) for name, ip in HOST_IPS.items()}
        # One control port for every host, each on its own address.
        self.control_port = next(p for p in iter(lambda: free_port("127.0.0.2"), None)
                                 if p not in ports.values() and all(_free(ip, p) for ip in HOST_IPS.values()))
        self.deploy_path = os.path.join(base, "deploy.toml")
        with open(self.deploy_path, "w") as f:
            f.write(deploy_toml(self.runtime_dir, self.log_dir, self.port, ports, self.control_port))
        self.front = settings.load(self.deploy_path, host="")
        self.hosts = {name: HostSupervisor(self.front.for_host(name)) for name in HOST_IPS}
        self.nginx: Optional[subprocess.Popen] = None

    def start(self) -> "MultiHost":
        try:
            os.makedirs(self.front.log_dir, exist_ok=True)
            render.render(self.front)   # nginx files + every host's supervisord.conf
            for h in self.hosts.values():
                h.start()
            self.nginx = subprocess.Popen([render.find_nginx(), "-c", os.path.join(self.runtime_dir, "nginx.conf")],
                                          stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                          stderr=subprocess.DEVNULL, start_new_session=True)
            for h in self.hosts.values():
                h.wait_ready()
            wait_for(self._nginx_up, 20, "nginx")
        except BaseException:
            self.stop()
            raise
        return self

    def _nginx_up(self) -> bool:
        if self.nginx.poll() is not None:
            raise RuntimeError("nginx exited with %s" % self.nginx.returncode)
        return port_open(self.port)

    def stop(self) -> None:
        try:
            if self.nginx is not None and self.nginx.poll() is None:
                self.nginx.send_signal(signal.SIGQUIT)
                try:
                    self.nginx.wait(15)
                except subprocess.TimeoutExpired:
                    os.killpg(self.nginx.pid, signal.SIGKILL)
                    self.nginx.wait(10)
            for h in self.hosts.values():
                h.stop()
        finally:
            shutil.rmtree(self.runtime_dir, ignore_errors=True)

    def host_of(self, pid: int) -> Optional[str]:
        for name, h in self.hosts.items():
            if h.proc is not None and pid in h.ready_pids():
                return name
        return None

    def get_pid(self) -> int:
        r = http_request("127.0.0.1", self.port, "GET", "/", timeout=30)
        assert r.status == 200, (r.status, r.body[:300])
        return int(r.body.split()[-1])

    def wait_in_rotation(self, name: str, timeout: float = 30.0) -> None:
        """GET until a response comes from host ``name``'s workers (nginx tried it again)."""
        pids = self.hosts[name].ready_pids()
        wait_for(lambda: self.get_pid() in pids, timeout, "host %s back in rotation" % name, interval=0.05)

    def diagnostics(self) -> str:
        return log_tails(self.log_dir, 30)


def _free(ip: str, port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind((ip, port))
            return True
        except OSError:
            return False


@pytest.fixture(scope="module")
def mh(tmp_path_factory):
    m = MultiHost(str(tmp_path_factory.mktemp("multihost")))
    m.start()
    yield m
    m.stop()


@pytest.fixture
def diagnose(mh, request):
    yield
    print_logs_if_failed(request, "multi-host logs", mh.diagnostics)


def connect_from(source_ip: str, address: tuple, timeout: float = 10.0) -> fcgiclient.FastCGIConnection:
    """A test FastCGI connection whose source address is ``source_ip``."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    sock.bind((source_ip, 0))
    sock.connect(address)
    conn = fcgiclient.FastCGIConnection.__new__(fcgiclient.FastCGIConnection)
    conn.sock, conn.timeout, conn._buf = sock, timeout, bytearray()
    return conn


def test_every_host_serves_through_one_nginx(mh, diagnose):
    seen = set()
    for _ in range(30):
        seen.add(mh.host_of(mh.get_pid()))
        if seen == set(HOST_IPS):
            break
    assert seen == set(HOST_IPS)


def test_status_on_the_web_server_lists_every_hosts_workers(mh, diagnose):
    env = {k: v for k, v in os.environ.items() if k != settings.HOST_ENV}   # the front view

    def status(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "fcgi_toolkit", "status", "-c", mh.deploy_path,
                               "--timeout", "10", *args], env=env, stdin=subprocess.DEVNULL,
                              capture_output=True, text=True, timeout=60)

    r = status("--json")
    assert r.returncode == 0, r.stderr
    obj = json.loads(r.stdout)
    assert obj["group"] == "mh" and obj["down"] == [] and obj["up"] == 3
    assert [h["name"] for h in obj["hosts"]] == list(HOST_IPS)
    for h in obj["hosts"]:
        host = mh.hosts[h["name"]]
        assert h["up"] and h["error"] is None
        assert h["control_url"] == "http://%s:%d" % (HOST_IPS[h["name"]], mh.control_port)
        # The third slot is the standby's spare: hidden while it holds no process.
        assert [w["name"] for w in h["workers"]] == host.dep.slot_names()[:2] == ["mh_00", "mh_01"]
        assert len(host.dep.slot_names()) == 3
        running = [w for w in h["workers"] if w["state"] in ("ready", "busy")]
        # Each host's worker as that host sees it: its supervisord, scoreboard and
        # state file, through its fcgi plugin (fcgi_toolkit.rpcinterface).
        # One serving worker; the warm standby (RUNNING, accepting nothing) is apart.
        assert h["running"] == len(running) == 1
        assert {w["pid"] for w in running} == host.ready_pids()
        assert running[0]["age_seconds"] is not None and running[0]["rss_bytes"] > 0
        assert running[0]["requests"] is not None and running[0]["recycles"] is not None
        assert [w["state"] for w in h["workers"] if w not in running] == ["warm"]

    r = status()
    assert r.returncode == 0, r.stderr
    rows = [line.split() for line in r.stdout.splitlines()[1:7]]
    assert sorted((row[0], row[1], row[2]) for row in rows) == sorted(
        (h["name"], w["name"], w["state"]) for h in obj["hosts"] for w in h["workers"])
    assert "mh: 3 hosts, 3 up, 0 down; 3/3 workers running" in r.stdout
    assert r.stdout.splitlines()[0].split()[4:6] == ["RSS", "REQS"]
    assert status_mod.REMOTE_NOTE not in r.stdout


def test_worker_refuses_addresses_not_in_web_servers(mh, diagnose):
    web1 = mh.hosts["web1"]
    address = (HOST_IPS["web1"], web1.dep.host.port)
    # From nginx's address: served.
    with connect_from("127.0.0.1", address) as conn:
        resp = conn.request("/pid", timeout=10)
    assert resp.status == 200 and int(resp.body) in web1.ready_pids()
    # From another address: the worker closes the connection without a byte.
    with connect_from("127.0.0.9", address) as conn:
        try:
            conn.start("/pid")
        except (BrokenPipeError, ConnectionResetError):
            pass   # closed before the request was even sent
        else:
            assert conn.wait_closed(10), "connection from 127.0.0.9 not closed"
        assert not conn._buf, "no byte of a response"

    def logs() -> str:
        text = ""
        for slot in web1.dep.slot_names():
            path = os.path.join(web1.dep.log_dir, slot + ".log")
            if os.path.exists(path):
                with open(path, errors="replace") as f:
                    text += f.read()
        return text
    # supervisord copies the worker's stderr into the log file asynchronously.
    wait_for(lambda: "refusing FastCGI connection from 127.0.0.9" in logs(), 10, "the refusal logged")
    # The socket itself listens on the host's own address only.
    with pytest.raises(OSError):
        with socket.create_connection(("127.0.0.1", web1.dep.host.port), timeout=5):
            pass


def test_graceful_host_stop_loses_no_get_and_host_returns(mh, diagnose):
    victim = mh.hosts["web3"]
    load = LoadGenerator("127.0.0.1", mh.port, "/", threads=4, duration=120, timeout=30, pause=0.01)
    with load:
        wait_for(lambda: load.total >= 50, 30, "load before the stop")
        victim.stop()
        mark = load.total
        wait_for(lambda: load.total >= mark + 200, 60, "load after the stop")
        seen = {mh.host_of(mh.get_pid()) for _ in range(10)}
        assert "web3" not in seen
        victim.start()
        victim.wait_ready()
        mh.wait_in_rotation("web3")
        mark = load.total
        wait_for(lambda: load.total >= mark + 50, 60, "load after the return")
    assert load.total > 300 and load.failed == 0, load.summary()


def test_crashed_host_loses_no_get_and_inflight_post_gets_fast_502(mh, diagnose):
    victim = mh.hosts["web2"]
    posts: list[dict] = []
    lock = threading.Lock()
    sleep = 20   # seconds each POST sleeps in the app

    def post(i: int) -> None:
        entry = {"i": i}
        try:
            r = http_request("127.0.0.1", mh.port, "POST", "/sleep?s=%d" % sleep, body=b"x" * 100,
                             headers={"Content-Type": "application/octet-stream"}, timeout=sleep + 40)
            entry.update(status=r.status, body=r.body)
        except OSError as exc:
            entry.update(status=None, body=repr(exc).encode())
        entry["done"] = time.monotonic()
        with lock:
            posts.append(entry)

    def posts_in_flight() -> int:
        return sum(1 for h in mh.hosts.values() for r in h.inflight() if r.method == "POST")

    # POSTs one at a time, each in flight before the next: with no other
    # traffic nginx's round robin gives each host one in turn.
    threads = []
    for i in range(6):
        t = threading.Thread(target=post, args=(i,), daemon=True)
        t.start()
        threads.append(t)
        wait_for(lambda: posts_in_flight() == i + 1, 10, "POST %d in flight" % i, interval=0.02)
        if any(r.method == "POST" for r in victim.inflight()):
            break
    else:
        pytest.fail("no POST reached web2 in 6 tries")

    load = LoadGenerator("127.0.0.1", mh.port, "/", threads=4, duration=120, timeout=30, pause=0.01)
    with load:
        wait_for(lambda: load.total >= 50, 30, "load before the crash")
        assert not posts, "a POST finished before the crash: %r" % posts
        victim.kill()
        killed = time.monotonic()
        mark = load.total
        wait_for(lambda: load.total >= mark + 200, 60, "load after the crash")
        for t in threads:
            t.join(sleep + 60)
        assert not any(t.is_alive() for t in threads), "a POST hung"
        victim.start()
        victim.wait_ready()
        mh.wait_in_rotation("web2")
    assert load.failed == 0, load.summary()

    statuses = sorted(p["status"] for p in posts)
    assert set(statuses) <= {200, 502} and statuses.count(502) == 1, posts
    failed = next(p for p in posts if p["status"] == 502)
    assert b"502 Bad Gateway" in failed["body"]
    # The 502 is the crash, answered at once: it came before any POST on a
    # surviving host finished its sleep, i.e. it did not wait for the app.
    finished_ok = [p["done"] for p in posts if p["status"] == 200]
    assert all(failed["done"] < done for done in finished_ok)
    assert failed["done"] - killed < sleep, "the 502 waited as long as the request itself"
