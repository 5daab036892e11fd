"""Tier 3: a multi-host rollout for real (README "Several hosts: apply").

Three hosts on 127.0.0.2-4, each ``FCGI_TOOLKIT_HOST=NAME fcgi-toolkit
run`` (one single-thread worker of a slow endpoint), one nginx on 127.0.0.1
started on the rendered web-server files, 64 clients past capacity the whole
time.  ``apply`` on the web server (the front view) restarts the hosts one at
a time out of rotation: zero failed requests, the change in effect on every
host; a change whose app does not import stops at the first host, which
serves its previous deployment again, and leaves the others untouched.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import xmlrpc.client
from typing import Optional

import psutil
import pytest

from conftest import requires_nginx
from harness import (APPS_DIR, LoadGenerator, free_port, http_request, kill_all, log_tails,
                     port_open, print_logs_if_failed, wait_for)
from fcgi_toolkit import render, settings, supervisord

pytestmark = [pytest.mark.integration, requires_nginx]

HOST_IPS = {"web1": "127.0.0.2", "web2": "127.0.0.3", "web3": "127.0.0.4"}
USER, PASSWORD = "ops", "roll-s3cret"
SLOW = "/sleep?s=0.05"      # 3 hosts x 1 worker x 1 thread: ~60 requests/s; 64 clients queue


def _free_everywhere(port: int) -> bool:
    for ip in HOST_IPS.values():
        with socket.socket() as s:
            try:
                s.bind((ip, port))
            except OSError:
                return False
    return True


class RunHost:
    """One host: ``fcgi-toolkit run`` with FCGI_TOOLKIT_HOST, in its own session."""

    def __init__(self, cluster: "Cluster", name: str):
        self.cluster, self.name = cluster, name
        self.proc: Optional[subprocess.Popen] = None

    @property
    def dep(self) -> settings.Deployment:
        return settings.load(self.cluster.deploy_path, host=self.name)

    def start(self) -> None:
        env = dict(os.environ, PYTHONUNBUFFERED="1", **{settings.HOST_ENV: self.name})
        os.makedirs(self.cluster.log_dir, exist_ok=True)
        self._out = open(os.path.join(self.cluster.log_dir, "run-%s.out" % self.name), "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "fcgi_toolkit", "run", "-c", self.cluster.deploy_path],
            env=env, stdin=subprocess.DEVNULL, stdout=self._out, stderr=subprocess.STDOUT,
            start_new_session=True)

    def rpc(self) -> xmlrpc.client.ServerProxy:
        return supervisord.proxy("unix://" + self.dep.control_socket)

    def supervisord_pid(self) -> Optional[int]:
        if self.proc is None or self.proc.poll() is not None:
            raise RuntimeError("run of %s exited: %s" % (self.name, self.proc and self.proc.returncode))
        try:
            return int(self.rpc().supervisor.getPID())
        except (OSError, xmlrpc.client.Error):
            return None

    def status(self) -> Optional[dict]:
        """The host's own ``status --json`` (None while its supervisord does not answer)."""
        r = subprocess.run([sys.executable, "-m", "fcgi_toolkit", "status", "-c",
                            self.cluster.deploy_path, "--json"],
                           env=dict(os.environ, **{settings.HOST_ENV: self.name}),
                           stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60)
        return json.loads(r.stdout) if r.returncode == 0 else None

    def ready_pids(self) -> set:
        """Pids of the workers ready in the host's own status."""
        status = self.status() or {"workers": []}
        return {w["pid"] for w in status["workers"] if w["state"] in ("ready", "busy")}

    def wait_ready(self, count: int = 1, timeout: float = 60.0) -> set:
        return wait_for(lambda: len(self.ready_pids()) >= count and self.ready_pids(), timeout,
                        "host %s ready" % self.name)

    def stop(self) -> None:
        if self.proc is None:
            return
        known = []
        try:
            known = [psutil.Process(self.proc.pid)] + psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.Error:
            pass
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(40)
            except subprocess.TimeoutExpired:
                pass
        kill_all(known, timeout=10)
        self._out.close()
        self.proc = None


class Cluster:
    def __init__(self, base: str):
        self.base = base
        # Short: unix socket paths are at most 100 bytes.
        self.runtime_dir = tempfile.mkdtemp(prefix="fct-ro-")
        os.chmod(self.runtime_dir, 0o755)   # nginx's unprivileged workers write body temp files here
        self.log_dir = os.path.join(base, "log")
        self.port = free_port()
        self.ports = {name: free_port(ip) for name, ip in HOST_IPS.items()}
        self.control_port = next(p for p in iter(lambda: free_port("127.0.0.2"), None)
                                 if p not in self.ports.values() and _free_everywhere(p))
        self.deploy_path = os.path.join(base, "deploy.toml")
        self.environment = {"RELEASE": "1"}
        self.wsgi = "core_app:application"
        self.write()
        self.hosts = {name: RunHost(self, name) for name in HOST_IPS}
        self.nginx: Optional[subprocess.Popen] = None

    @property
    def nginx_conf(self) -> str:
        return os.path.join(self.runtime_dir, "nginx.conf")

    def write(self) -> None:
        env = ", ".join('%s = "%s"' % kv for kv in sorted(self.environment.items()))
        lines = [
            "[app]", 'name = "ro"', 'wsgi = "%s"' % self.wsgi, 'directory = "%s"' % APPS_DIR,
            "environment = { %s }" % env,
            "[workers]", "count = 1", "standby = 0", "threads = 1", 'graceful_timeout = "10s"',
            "[recycle]", 'ready_timeout = "15s"',
            "[nginx]", 'listen = "127.0.0.1:%d"' % self.port, 'web_servers = ["127.0.0.1"]',
            'connect_timeout = "1s"', 'read_timeout = "60s"',
            'reload = ["%s", "-c", "%s", "-s", "reload"]' % (render.find_nginx(), self.nginx_conf),
            "[runtime]", 'dir = "%s"' % self.runtime_dir, 'log_dir = "%s"' % self.log_dir,
            "[control]", 'inet_port = "%d"' % self.control_port, 'username = "%s"' % USER,
            'password = "%s"' % PASSWORD,
        ]
        for name, ip in HOST_IPS.items():
            lines += ["[[hosts]]", 'name = "%s"' % name, 'address = "%s:%d"' % (ip, self.ports[name]),
                      'fail_timeout = "2s"']
        tmp = self.deploy_path + ".tmp"
        with open(tmp, "w") as f:
            f.write("\n".join(lines) + "\n")
        os.replace(tmp, self.deploy_path)

    def start(self) -> "Cluster":
        try:
            front = settings.load(self.deploy_path, host="")
            os.makedirs(front.log_dir, exist_ok=True)
            render.render(front)
            for h in self.hosts.values():
                h.start()
            self.nginx = subprocess.Popen([render.find_nginx(), "-c", self.nginx_conf],
                                          stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                          stderr=subprocess.DEVNULL, start_new_session=True)
            for h in self.hosts.values():
                h.wait_ready()
            wait_for(lambda: port_open(self.port), 20, "nginx")
        except BaseException:
            self.stop()
            raise
        return self

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

    def apply(self, *args: str, timeout: float = 240) -> subprocess.CompletedProcess:
        """``apply`` on the web server: the front view (no FCGI_TOOLKIT_HOST)."""
        env = {k: v for k, v in os.environ.items() if k != settings.HOST_ENV}
        return subprocess.run([sys.executable, "-m", "fcgi_toolkit", "apply", "-c",
                               self.deploy_path, *args], env=env, stdin=subprocess.DEVNULL,
                              capture_output=True, text=True, timeout=timeout)

    def apply_under_load(self, *args: str) -> subprocess.CompletedProcess:
        load = LoadGenerator("127.0.0.1", self.port, SLOW, threads=64, duration=200, timeout=60)
        with load:
            wait_for(lambda: load.total >= 64, 60, "the load to be served before apply")
            r = self.apply(*args)
            served = load.total
            wait_for(lambda: load.total >= served + 64, 60, "requests served after apply")
        assert load.failed == 0, load.summary() + "\n" + r.stdout + r.stderr
        return r

    def environ_by_host(self) -> dict:
        """RELEASE as each host's worker sees it, through nginx (until every host answered)."""
        by_host = {}

        def sample() -> bool:
            r = http_request("127.0.0.1", self.port, "GET", "/osenv?k=%s&k=RELEASE"
                             % settings.HOST_ENV, timeout=30)
            assert r.status == 200, r.body[:300]
            env = json.loads(r.body)
            by_host[env[settings.HOST_ENV]] = env["RELEASE"]
            return set(by_host) >= set(HOST_IPS)
        wait_for(sample, 60, "a response from every host", interval=0.01)
        return by_host

    def diagnostics(self) -> str:
        return log_tails(self.log_dir, 25)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    c = Cluster(str(tmp_path_factory.mktemp("rollout")))
    c.start()
    yield c
    c.stop()


@pytest.fixture
def diagnose(cluster, request):
    yield
    print_logs_if_failed(request, "rollout logs", cluster.diagnostics)


def _rotation_lines(stdout: str) -> list:
    return re.findall(r"^apply: (web\d) (out of|back in) rotation", stdout, re.M)


def test_a_change_rolls_over_every_host_one_at_a_time_under_load(cluster, diagnose):
    assert set(cluster.environ_by_host().values()) == {"1"}
    runs = {n: h.proc.pid for n, h in cluster.hosts.items()}
    before = {n: h.supervisord_pid() for n, h in cluster.hosts.items()}
    cluster.environment = {"RELEASE": "2"}
    cluster.write()
    r = cluster.apply_under_load()
    assert r.returncode == 0, r.stdout + r.stderr
    # One host out at a time: each is back before the next goes out.
    assert _rotation_lines(r.stdout) == [(n, w) for n in HOST_IPS for w in ("out of", "back in")], r.stdout
    assert cluster.environ_by_host() == {n: "2" for n in HOST_IPS}
    for name, host in cluster.hosts.items():
        # A new supervisord (a new generation of the host), started by the same run.
        assert host.proc.pid == runs[name] and host.proc.poll() is None
        assert host.supervisord_pid() not in (None, before[name])
    # Nothing left to apply, and no rollout under way.
    r = cluster.apply()
    assert r.returncode == 0 and "nothing changed" in r.stdout, r.stdout + r.stderr
    assert not os.path.exists(os.path.join(cluster.runtime_dir, "rollout.json"))


def test_an_app_that_does_not_import_stops_at_the_first_host(cluster, diagnose):
    release = cluster.environ_by_host()["web1"]
    before = {n: h.supervisord_pid() for n, h in cluster.hosts.items()}
    cluster.wsgi = "core_broken:application"
    cluster.write()
    try:
        r = cluster.apply_under_load()
        assert r.returncode == 1, r.stdout + r.stderr
        assert "not applied on web1" in r.stderr and "web1 serves its previous deployment" in r.stderr
        assert _rotation_lines(r.stdout) == [("web1", "out of")], r.stdout
        # web1 runs a supervisord again (its previous file); the others never restarted.
        assert cluster.hosts["web1"].supervisord_pid() not in (None, before["web1"])
        assert {n: cluster.hosts[n].supervisord_pid() for n in ("web2", "web3")} == \
            {n: before[n] for n in ("web2", "web3")}
        assert cluster.environ_by_host() == {n: release for n in HOST_IPS}
        # web1 runs its previous file while deploy.toml holds the change: drift.
        assert "app.wsgi" in cluster.hosts["web1"].status()["drift"]
    finally:
        cluster.wsgi = "core_app:application"
        cluster.write()
    r = cluster.apply()
    assert r.returncode == 0 and "nothing changed" in r.stdout, r.stdout + r.stderr


def test_new_supervisord_everywhere_and_a_host_moved_to_another_port(cluster, diagnose):
    before = {n: h.supervisord_pid() for n, h in cluster.hosts.items()}
    old_port = cluster.ports["web2"]
    cluster.ports["web2"] = next(p for p in iter(lambda: free_port(HOST_IPS["web2"]), None)
                                 if p not in (old_port, cluster.control_port))
    cluster.write()
    r = cluster.apply_under_load("--new-supervisord")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "web2 (workers.socket)" in r.stdout and "web1 (--new-supervisord)" in r.stdout, r.stdout
    for name, host in cluster.hosts.items():
        assert host.supervisord_pid() not in (None, before[name])
    assert port_open(cluster.ports["web2"], HOST_IPS["web2"])
    assert not port_open(old_port, HOST_IPS["web2"])
    with open(cluster.nginx_conf.replace("nginx.conf", "nginx-site.conf")) as f:
        site = f.read()
    assert "%s:%d" % (HOST_IPS["web2"], cluster.ports["web2"]) in site and " down" not in site
    assert set(cluster.environ_by_host()) == set(HOST_IPS)
