"""``fcgi-toolkit install`` / ``uninstall``: the distribution's supervisord and nginx, systemd.

Tier 1: the plan (fragment read back by supervisord's own parser through an
[include], client conf, site, links, commands), refusals, dry run.
Tier 3: a stock supervisord started from a Debian-like main file (``[include]
files = confd/*.conf``) with another program already running; the fragment
added with reread + update; workers, watchdog, status, recycle, reload and
``supervisorctl fcgi`` work; the other program keeps its pid; uninstall +
update remove the deployment cleanly.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import xmlrpc.client

import psutil
import pytest

from fcgi_toolkit import install, render, settings
from fcgi_toolkit.settings import ConfigError
from harness import APPS_DIR, free_port, http_request, port_open, toml_dumps, wait_for

ROOT_HOST = render.Host(euid=0, user="root", nginx_binary="/usr/sbin/nginx", mime_types="",
                        web_user="www-data", web_group="www-data")

MAIN_CONF = """\
; A Debian-like main file: the distribution's supervisord.conf.
[unix_http_server]
file=%(here)s/supervisor.sock
chmod=0700

[supervisord]
logfile=%(here)s/supervisord.log
pidfile=%(here)s/supervisord.pid
childlogdir=%(here)s

[rpcinterface:supervisor]
supervisor.rpcinterface_factory = supervisor.rpcinterface:make_main_rpcinterface

[supervisorctl]
serverurl=unix://%(here)s/supervisor.sock

[program:other]
command=/bin/sleep 100000

[include]
files = confd/*.conf
"""


@pytest.fixture
def system(request):
    """A short, world-searchable base dir (unix socket paths are short; the
    system nginx runs as www-data) with the main file, confd/ and nginx dirs."""
    base = tempfile.mkdtemp(prefix="fct-inst-")
    request.addfinalizer(lambda: shutil.rmtree(base, ignore_errors=True))
    os.chmod(base, 0o755)
    os.mkdir(os.path.join(base, "confd"))
    with open(os.path.join(base, "supervisord.conf"), "w") as f:
        f.write(MAIN_CONF)
    return base


def write_deploy(base: str, **sections) -> str:
    data = {"app": {"name": "core", "wsgi": "core_app:application", "directory": APPS_DIR},
            "workers": {"count": 2, "standby": 1, "graceful_timeout": "10s"},
            "control": {"system_supervisord": os.path.join(base, "supervisord.conf")},
            "runtime": {"dir": os.path.join(base, "rt")}}
    for section, table in sections.items():
        data.setdefault(section, {}).update(table)
    path = os.path.join(base, "deploy.toml")
    with open(path, "w") as f:
        f.write(toml_dumps(data))
    return path


def plan(base: str, host=ROOT_HOST, rpc_plugin: bool = True, **sections) -> install.Plan:
    dep = settings.load(write_deploy(base, **sections))
    return install.plan_supervisor(dep, host, sites_available=os.path.join(base, "sites-available"),
                                   sites_enabled=os.path.join(base, "sites-enabled"), rpc_plugin=rpc_plugin)


def p_deploy(base: str) -> str:
    return os.path.join(base, "deploy.toml")


def toolkit(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fcgi_toolkit", *args], stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=timeout)


def nginx_dirs(base: str) -> list[str]:
    return ["--sites-available", os.path.join(base, "sites-available"),
            "--sites-enabled", os.path.join(base, "sites-enabled")]


# -- tier 1 ---------------------------------------------------------------------

def test_fragment_is_read_by_supervisord_through_the_include(system):
    from supervisor.options import ServerOptions

    p = plan(system)
    fragment = os.path.join(system, "confd", "core.conf")
    client = os.path.join(system, "rt", "supervisorctl.conf")
    site = os.path.join(system, "sites-available", "core.conf")
    assert set(p.files) == {fragment, client, site}
    assert p.links == {os.path.join(system, "sites-enabled", "core.conf"): site}
    with open(fragment, "w") as f:
        f.write(p.files[fragment])
    for directory in p.directories:   # supervisord refuses a log file in a missing directory
        os.makedirs(directory)
    options = ServerOptions()
    options.realize(args=["-c", os.path.join(system, "supervisord.conf")])
    groups = {g.name: g for g in options.process_group_configs}
    # No nginx program (the system's nginx serves), no [group:x] (it would drop the socket).
    assert set(groups) == {"other", "core", "core_watchdog"}
    # The plugin's section, merged from the include, under a per-deployment name.
    from fcgi_toolkit import rpcinterface
    factories = {name: (factory, config) for name, factory, config in options.rpcinterface_factories}
    assert factories["fcgi_core"] == (rpcinterface.make_rpcinterface, {"deploy": p_deploy(system)})
    import grp
    assert groups["core"].socket_config.get_owner() == (0, grp.getgrnam("www-data").gr_gid)
    assert groups["core"].socket_config.get_mode() == 0o660
    sections = re.findall(r"^\[([^\]:]+)", p.files[fragment], re.M)
    # [rpcinterface:fcgi] may live in an included file: supervisord merges includes first.
    assert set(sections) == {"rpcinterface", "fcgi-program", "eventlistener"}, sections
    # supervisorctl reads no included file: the plugin is in the client conf.
    assert "serverurl=unix://%s/supervisor.sock" % system in p.files[client]
    assert "[ctlplugin:fcgi]" in p.files[client]
    assert p.commands[:2] == ("supervisorctl -c %s/supervisord.conf reread" % system,
                              "supervisorctl -c %s/supervisord.conf update core core_watchdog" % system)
    assert all(install.MARK in text[:400] for text in p.files.values())
    assert "fcgi status" in p.commands[-1] and "-m supervisor.supervisorctl -c %s" % client in p.commands[-1]
    # Without --rpc-plugin (the default) no plugin the system supervisord might fail to import,
    # and the fragment still reads back.
    plain = plan(system, rpc_plugin=False).files[fragment]
    assert "supervisor.rpcinterface_factory" not in plain
    with open(fragment, "w") as f:
        f.write(plain)
    options = ServerOptions()
    options.realize(args=["-c", os.path.join(system, "supervisord.conf")])
    assert [name for name, _, _ in options.rpcinterface_factories] == ["supervisor"]
    assert {g.name for g in options.process_group_configs} == {"other", "core", "core_watchdog"}


SITE_LAYOUT_CASES = [
    ("nginx", "sites-available/core.conf", "sites-enabled/core.conf", "nginx -t && systemctl reload nginx"),
    ("apache", "sites-available/core.conf", "sites-enabled/core.conf",
     "apache2ctl configtest && systemctl reload apache2"),
    ("lighttpd", "sites-available/50-core.conf", "sites-enabled/50-core.conf",
     "lighttpd -tt -f /etc/lighttpd/lighttpd.conf && systemctl reload lighttpd"),
    ("caddy", "sites-available/core.caddy", None,
     "caddy validate --config /etc/caddy/Caddyfile --adapter caddyfile && systemctl reload caddy"),
]


@pytest.mark.parametrize("server,site,link,reload", SITE_LAYOUT_CASES,
                         ids=[c[0] for c in SITE_LAYOUT_CASES])
def test_site_for_the_distributions_web_server(system, tmp_path, server, site, link, reload):
    """web.server picks the site file, its name, its enabling link and the
    reload command; the site is the very file ``render`` writes for that server."""
    sections = {"web": {"server": server}, "nginx": {"managed": False, "listen": "127.0.0.1:8089"}}
    p = plan(system, **sections)
    site_path = os.path.join(system, site)
    assert site_path in p.files and install.MARK in p.files[site_path]
    assert p.links == ({os.path.join(system, link): site_path} if link else {})
    # After supervisord has the workers: reread, update, (enable), reload.
    assert p.commands.index(reload) > next(i for i, c in enumerate(p.commands) if " update " in c)
    if server == "apache":
        assert "a2enmod proxy_fcgi alias" in p.commands
    if server == "caddy":
        # Debian's Caddyfile has no include directory: one import line, added once.
        assert ("grep -qxF 'import %s/*.caddy' /etc/caddy/Caddyfile || echo 'import %s/*.caddy' "
                ">> /etc/caddy/Caddyfile" % ((os.path.join(system, "sites-available"),) * 2)) in p.commands
    dep = settings.load(p_deploy(system))
    rendered = render.render_all(dep, ROOT_HOST, str(tmp_path))
    name = render.SITE_FILES[server][-1]
    # The same template and values: only the socket's owner line may differ (install
    # gives the socket the web server's group).
    strip = lambda text: [l for l in text.splitlines() if "socket_owner" not in l]  # noqa: E731
    assert strip(p.files[site_path]) == strip(rendered[name])
    # The uninstall commands reload that server first.
    r = toolkit("uninstall", "-c", p_deploy(system), *nginx_dirs(system))
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[1].strip() == reload


def test_site_is_accepted_by_the_real_server(system, tmp_path):
    """The installed Apache, lighttpd and Caddy sites pass the servers' own
    configuration test when included as the distribution's main file includes them."""
    import webservers
    checked = 0
    for server in ("apache", "lighttpd", "caddy"):
        binary = webservers.binary(server)
        if not binary:
            continue
        p = plan(system, web={"server": server}, nginx={"managed": False, "listen": "127.0.0.1:8089"})
        site = next(path for path in p.files if "sites-available" in path)
        with open(os.path.join(str(tmp_path), "site-" + server), "w") as f:
            f.write(p.files[site])
        main = os.path.join(str(tmp_path), "main-" + server)
        if server == "apache":
            text = webservers._apache_conf(str(tmp_path), f.name, drop=False)
            cmd = [binary, "-t", "-f", main]
        elif server == "lighttpd":
            text = webservers._lighttpd_conf(str(tmp_path), f.name, 8089, drop=False)
            cmd = [binary, "-tt", "-f", main]
        else:
            text = webservers._caddy_conf(str(tmp_path), f.name)
            cmd = [binary, "validate", "--config", main, "--adapter", "caddyfile"]
        with open(main, "w") as out:
            out.write(text)
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=60,
                           env=dict(os.environ, HOME=str(tmp_path), XDG_DATA_HOME=str(tmp_path),
                                    XDG_CONFIG_HOME=str(tmp_path)))
        assert r.returncode == 0, (server, r.stdout + r.stderr)
        checked += 1
    if not checked:
        pytest.skip("none of apache2, lighttpd, caddy is installed")


def test_refusals_are_one_line(system):
    with pytest.raises(ConfigError, match=r"control.system_supervisord = '': install adds"):
        plan(system, control={"system_supervisord": ""})
    dep = settings.load(write_deploy(system))
    with pytest.raises(ConfigError, match=r"does not pick up /tmp/core.conf"):
        install.plan_supervisor(dep, ROOT_HOST, conf_dir="/tmp")
    with pytest.raises(ConfigError, match=r"control.system_supervisord = '/nonexistent.conf': no such file"):
        plan(system, control={"system_supervisord": "/nonexistent.conf"})
    with pytest.raises(ConfigError, match=r"workers.socket_mode = '0600': the system nginx"):
        plan(system, workers={"socket_mode": "0600"})
    private = os.path.join(system, "private")
    os.mkdir(private, 0o700)
    with pytest.raises(ConfigError, match=r"workers.socket = .*www-data cannot enter %s" % private):
        plan(system, workers={"socket": "unix://%s/x/core.sock" % private})
    with pytest.raises(ConfigError, match=r"workers.socket = 'tcp://0.0.0.0:9000'"):
        plan(system, workers={"socket": "tcp://0.0.0.0:9000"})


def test_dry_run_writes_nothing_and_bad_input_exits_2(system):
    path = write_deploy(system)
    before = sorted(os.listdir(system))
    r = toolkit("install", "-c", path, "--dry-run", *nginx_dirs(system))
    assert r.returncode == 0, r.stderr
    assert "=== would write %s/confd/core.conf (mode 0644) ===" % system in r.stdout
    assert "[fcgi-program:core]" in r.stdout and "supervisorctl -c %s/supervisord.conf reread" % system in r.stdout
    assert sorted(os.listdir(system)) == before
    r = toolkit("install", "-c", path, "--conf-dir", "/tmp", *nginx_dirs(system))
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and r.stdout == ""
    assert r.stderr.startswith("fcgi-toolkit: %s: control.system_supervisord = " % path)
    assert sorted(os.listdir(system)) == before
    r = toolkit("run", "-c", path)
    assert r.returncode == 2 and "control.system_supervisord" in r.stderr
    # --rpc-plugin only when the running supervisord's Python is known to import it.
    r = toolkit("install", "-c", path, "--rpc-plugin", *nginx_dirs(system))
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and r.stdout == ""
    assert "--rpc-plugin: its supervisord does not answer" in r.stderr
    assert sorted(os.listdir(system)) == before


def test_uninstall_removes_only_our_files(system):
    p = plan(system)
    dep = settings.load(write_deploy(system))
    install.apply(p, dep)
    foreign = os.path.join(system, "confd", "mine.conf")
    with open(foreign, "w") as f:
        f.write("[program:mine]\ncommand=/bin/true\n")
    assert sorted(install.remove(p)) == sorted(list(p.files) + list(p.links))
    assert os.listdir(os.path.join(system, "confd")) == ["mine.conf"]
    # A file of the same name that we did not write stays.
    with open(os.path.join(system, "confd", "core.conf"), "w") as f:
        f.write("[program:core]\ncommand=/bin/true\n")
    assert os.path.join(system, "confd", "core.conf") not in install.remove(p)


def test_systemd_unit(tmp_path):
    base = str(tmp_path)
    path = write_deploy(base, control={"system_supervisord": ""}, nginx={"managed": False})
    dep = settings.load(path)
    p = install.plan_systemd(dep, render.Host(euid=1000, user="alice", nginx_binary="nginx", mime_types=""),
                             systemd_dir=base)
    unit = os.path.join(base, "fcgi-toolkit-core.service")
    text = p.files[unit]
    assert "ExecStart=%s -m fcgi_toolkit run -c %s\n" % (dep.python, dep.path) in text
    assert "KillSignal=SIGTERM\n" in text and "KillMode=mixed\n" in text
    assert "TimeoutStopSec=%d\n" % install.systemd_stop_timeout(dep) in text
    assert p.commands == ("systemctl daemon-reload", "systemctl enable --now fcgi-toolkit-core.service")
    analyze = shutil.which("systemd-analyze")
    if analyze:
        with open(unit, "w") as f:
            f.write(text)
        r = subprocess.run([analyze, "verify", unit], capture_output=True, text=True)
        assert "fcgi-toolkit-core.service:" not in r.stderr, r.stderr
    with pytest.raises(ConfigError, match="--systemd runs the deployment's own supervisord"):
        install.plan_systemd(settings.load(write_deploy(base)), ROOT_HOST, systemd_dir=base)


# -- tier 3 ---------------------------------------------------------------------

class SystemSupervisord:
    """The distribution's supervisord, started from the main file in ``base``."""

    def __init__(self, base: str):
        self.base = base
        self.conf = os.path.join(base, "supervisord.conf")
        self.proc = subprocess.Popen([sys.executable, "-m", "supervisor.supervisord", "-n", "-c", self.conf],
                                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL, start_new_session=True)
        self.known: dict[int, psutil.Process] = {}

    def server(self) -> xmlrpc.client.ServerProxy:
        from supervisor.xmlrpc import SupervisorTransport
        return xmlrpc.client.ServerProxy("http://127.0.0.1", transport=SupervisorTransport(
            None, None, "unix://" + os.path.join(self.base, "supervisor.sock")))

    def rpc(self):
        return self.server().supervisor

    def infos(self) -> dict[str, dict]:
        for p in psutil.Process(self.proc.pid).children(recursive=True):
            self.known.setdefault(p.pid, p)
        return {"%s:%s" % (i["group"], i["name"]): i for i in self.rpc().getAllProcessInfo()}

    def up(self) -> bool:
        if self.proc.poll() is not None:
            raise RuntimeError("supervisord exited with %s" % self.proc.returncode)
        try:
            return self.rpc().getState()["statename"] == "RUNNING"
        except OSError:
            return False

    def ctl(self, *args: str, conf: str = "") -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "supervisor.supervisorctl", "-c", conf or self.conf, *args],
                              stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=120)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.infos()
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        for p in self.known.values():
            try:
                if p.is_running():
                    p.kill()
            except psutil.Error:
                pass


def system_nginx(base: str, port: int) -> subprocess.Popen:
    """An nginx like Debian's: runs its workers as www-data, includes sites-enabled/*."""
    conf = os.path.join(base, "nginx.conf")
    user = "user www-data www-data;\n" if os.geteuid() == 0 else ""
    with open(conf, "w") as f:
        f.write("daemon off;\n%spid %s/nginx.pid;\nerror_log %s/nginx-error.log;\nevents {}\nhttp {\n"
                "    access_log off;\n    client_body_temp_path %s/nb;\n    fastcgi_temp_path %s/nf;\n"
                "    include %s/sites-enabled/*;\n}\n" % (user, base, base, base, base, base))
    return subprocess.Popen([render.find_nginx(), "-c", conf], stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)


def ready_count(path: str) -> int:
    r = toolkit("status", "-c", path, "--json", timeout=30)
    return json.loads(r.stdout)["ready"] if r.returncode == 0 else 0


@pytest.mark.integration
@pytest.mark.skipif(not render.find_nginx(), reason="nginx is not on PATH (or in /usr/sbin)")
def test_install_into_a_running_supervisord_and_out_again(system):
    port = free_port()
    path = write_deploy(system, nginx={"listen": "127.0.0.1:%d" % port})
    sup = SystemSupervisord(system)
    nginx = None
    try:
        wait_for(sup.up, 20, "the system supervisord")
        wait_for(lambda: sup.infos()["other:other"]["statename"] == "RUNNING", 20, "program other")
        other_pid = sup.infos()["other:other"]["pid"]

        r = toolkit("install", "-c", path, "--rpc-plugin", *nginx_dirs(system))
        assert r.returncode == 0, r.stderr
        assert "supervisorctl -c %s reread" % sup.conf in r.stdout
        update = [line.strip() for line in r.stdout.splitlines() if " update " in line][0]
        assert sup.ctl("reread").returncode == 0
        assert sup.ctl(*update.split()[3:]).returncode == 0, "update failed"
        nginx = system_nginx(system, port)

        wait_for(lambda: ready_count(path) >= 2, 90, "2 ready workers (fcgi-toolkit status)")
        wait_for(lambda: port_open(port), 20, "nginx")
        r = http_request("127.0.0.1", port, "GET", "/")
        assert r.status == 200 and r.body.startswith(b"hello from ")
        if os.geteuid() == 0:
            workers = psutil.Process(nginx.pid).children()
            assert workers and all(w.uids().real != 0 for w in workers)
        assert sup.infos()["other:other"]["pid"] == other_pid
        # The watchdog is RUNNING once it outlived its startsecs, which the
        # workers' readiness does not wait for: wait for it, do not sample it.
        wait_for(lambda: sup.infos()["core_watchdog:core_watchdog"]["statename"] == "RUNNING",
                 30, "the watchdog RUNNING")

        status = toolkit("status", "-c", path)
        assert status.returncode == 0 and "core_00" in status.stdout, status.stderr

        client = os.path.join(system, "rt", "supervisorctl.conf")
        out = sup.ctl("fcgi", "status", conf=client)
        assert out.returncode == 0 and "core_00" in out.stdout, out.stdout + out.stderr

        victim = next(i for n, i in sup.infos().items() if n.startswith("core:") and i["statename"] == "RUNNING")
        r = toolkit("recycle", "-c", path, victim["name"], timeout=120)
        assert r.returncode == 0, r.stdout + r.stderr
        # The replacement serves as soon as its scoreboard says ready (recycle.ready_early);
        # supervisord calls it RUNNING once startsecs have passed.
        running = wait_for(lambda: (lambda pids: len(pids) == 2 and pids)(
            {i["pid"] for n, i in sup.infos().items() if n.startswith("core:") and i["statename"] == "RUNNING"}),
            30, "two RUNNING workers after the recycle")
        assert victim["pid"] not in running
        r = toolkit("reload", "-c", path, timeout=180)
        assert r.returncode == 0, r.stdout + r.stderr
        assert http_request("127.0.0.1", port, "GET", "/").status == 200
        assert sup.infos()["other:other"]["pid"] == other_pid

        r = toolkit("uninstall", "-c", path, *nginx_dirs(system))
        assert r.returncode == 0, r.stderr
        assert os.listdir(os.path.join(system, "confd")) == []
        steps = [line.strip() for line in r.stdout.splitlines() if line.startswith("  supervisorctl")]
        assert steps == ["supervisorctl -c %s reread" % sup.conf,
                         "supervisorctl -c %s update core_watchdog" % sup.conf,
                         "supervisorctl -c %s update core" % sup.conf]
        for step in steps:
            out = sup.ctl(*step.split()[3:])
            assert out.returncode == 0, out.stdout + out.stderr
        infos = sup.infos()
        assert set(infos) == {"other:other"}
        assert infos["other:other"]["pid"] == other_pid and infos["other:other"]["statename"] == "RUNNING"
    finally:
        if nginx is not None and nginx.poll() is None:
            nginx.send_signal(signal.SIGQUIT)
            try:
                nginx.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(nginx.pid, signal.SIGKILL)
        sup.stop()


def test_run_refuses_what_a_root_started_nginx_cannot_reach(system):
    from fcgi_toolkit import runner
    private = os.path.join(system, "private")
    os.mkdir(private, 0o700)
    dep = settings.load(write_deploy(system, control={"system_supervisord": ""},
                                     runtime={"dir": os.path.join(private, "rt")}))
    with pytest.raises(ConfigError, match=r"runtime.dir = '%s/rt': nginx's workers run as www-data, "
                                          r"and www-data cannot enter %s \(mode 0700\)" % (private, private)):
        runner.check_nginx_reach(dep, ROOT_HOST)
    os.chmod(private, 0o755)
    runner.check_nginx_reach(dep, ROOT_HOST)
    # Not started by root: nginx cannot change user, nothing to check.
    os.chmod(private, 0o700)
    runner.check_nginx_reach(dep, render.Host(euid=1000, user="alice", nginx_binary="nginx", mime_types=""))
