"""Tier 1: several hosts (issue #6) — ``[[hosts]]`` parsing, the host and
front views, rendering (supervisor's own parser, ``nginx -t``), the render
command's files, and the FastCGI allow-list in the generated configs."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from fcgi_toolkit import render, settings
from fcgi_toolkit.settings import ConfigError

NGINX = render.find_nginx()
needs_nginx = pytest.mark.skipif(not NGINX, reason="nginx is not on PATH (or in /usr/sbin)")
USER_HOST = render.Host(euid=1000, user="alice", nginx_binary="/usr/sbin/nginx", mime_types="")

HOSTS = [
    {"name": "web1", "address": "127.0.0.2:9000", "count": 3},
    {"name": "web2", "address": "127.0.0.3:9000"},
    {"name": "spare", "address": "127.0.0.4:9000", "backup": True, "fail_timeout": "2s", "max_fails": 2},
]


def data(hosts=None, **sections) -> dict:
    out = {"app": {"name": "wiki", "wsgi": "wikiapp:application"},
           "nginx": {"web_servers": ["127.0.0.1", "10.0.0.5"]}}
    for section, table in sections.items():
        out.setdefault(section, {}).update(table)
    out["hosts"] = [dict(h) for h in (HOSTS if hosts is None else hosts)]
    return out


def parse(tmp_path, host=None, hosts=None, **sections) -> settings.Deployment:
    return settings.parse(data(hosts, **sections), str(tmp_path / "deploy.toml"), host)


def error(tmp_path, raw: dict, host=None) -> str:
    with pytest.raises(ConfigError) as info:
        settings.parse(raw, str(tmp_path / "deploy.toml"), host)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(str(tmp_path / "deploy.toml") + ": ")
    return message


def toml_text(raw: dict) -> str:
    """deploy.toml with [[hosts]] (JSON strings are TOML basic strings)."""
    def value(v):
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, list):
            return "[" + ", ".join(value(x) for x in v) + "]"
        return json.dumps(v)
    lines = []
    for section, table in raw.items():
        if section == "hosts":
            continue
        lines.append("[%s]" % section)
        lines += ["%s = %s" % (k, value(v)) for k, v in table.items()]
    for h in raw.get("hosts", []):
        lines.append("[[hosts]]")
        lines += ["%s = %s" % (k, value(v)) for k, v in h.items()]
    return "\n".join(lines) + "\n"


def write(tmp_path, raw: dict) -> str:
    path = tmp_path / "deploy.toml"
    path.write_text(toml_text(raw))
    return str(path)


# -- parsing ----------------------------------------------------------------

def test_hosts_parsed_with_defaults(tmp_path):
    dep = parse(tmp_path, workers={"count": 2})
    assert dep.multi_host and dep.host is None
    assert [h.name for h in dep.hosts] == ["web1", "web2", "spare"]
    web1, web2, spare = dep.hosts
    assert (web1.address, web1.count, web1.backup, web1.max_fails, web1.fail_timeout) == \
        ("127.0.0.2:9000", 3, False, 1, 10.0)
    assert web2.count == 2, "count defaults to workers.count"
    assert (spare.backup, spare.max_fails, spare.fail_timeout) == (True, 2, 2.0)
    assert (web1.ip, web1.port) == ("127.0.0.2", 9000)
    # The front view has no worker socket of its own.
    assert dep.socket_url == "" and not dep.socket_is_unix
    assert dep.nginx.web_servers == ["127.0.0.1", "10.0.0.5"]


def test_host_view(tmp_path):
    front = parse(tmp_path, workers={"count": 2, "standby": 1})
    view = parse(tmp_path, host="web1", workers={"count": 2, "standby": 1})
    assert view.host.name == "web1" and view.hosts == front.hosts
    assert view.workers.count == 3 and view.slots == 5      # 3 + 1 standby + its spare slot
    assert view.slot_names() == ["wiki_%02d" % i for i in range(5)]
    assert view.socket_url == "tcp://127.0.0.2:9000" and not view.socket_is_unix
    assert view.runtime_dir == os.path.join(front.runtime_dir, "web1")
    assert view.log_dir == os.path.join(front.log_dir, "web1")
    assert view.control_socket == os.path.join(front.runtime_dir, "web1", "supervisor.sock")
    assert view.scoreboard_path != front.for_host("web2").scoreboard_path
    assert front.for_host("web1") == view
    assert view.for_host("web1") is view
    # The front view is unchanged by taking a host view.
    assert front.workers.count == 2 and front.host is None


def test_load_selects_host_from_argument_or_environment(tmp_path, monkeypatch):
    path = write(tmp_path, data())
    monkeypatch.delenv(settings.HOST_ENV, raising=False)
    assert settings.load(path).host is None
    assert settings.load(path, host="web2").host.name == "web2"
    monkeypatch.setenv(settings.HOST_ENV, "web2")
    assert settings.load(path).host.name == "web2"
    assert settings.load(path, host="").host is None, '"" is the front view whatever the environment says'
    monkeypatch.setenv(settings.HOST_ENV, "nosuch")
    with pytest.raises(ConfigError) as info:
        settings.load(path)
    assert "host = 'nosuch'" in str(info.value) and "web1, web2, spare" in str(info.value)


def test_without_hosts_nothing_changes(tmp_path):
    raw = data()
    del raw["hosts"]
    del raw["nginx"]
    dep = settings.parse(raw, str(tmp_path / "deploy.toml"))
    assert not dep.multi_host and dep.hosts == () and dep.host is None
    assert dep.socket_is_unix and dep.nginx.web_servers == []
    message = error(tmp_path, raw, host="web1")
    assert "host = 'web1'" in message and "no [[hosts]]" in message


@pytest.mark.parametrize("index, key, value, reason", [
    (1, "address", "0.0.0.0:9000", "every interface"),
    (1, "address", "web2.example:9000", "not a host name"),
    (1, "address", "[::1]:9000", "IPv4"),
    (1, "address", "127.0.0.3", "IPv4:port"),
    (1, "address", "127.0.0.3:0", "IPv4:port"),
    (1, "address", "127.0.0.3:70000", "IPv4:port"),
    (1, "address", "127.0.0.2:9000", "host web1 has the same address"),
    (1, "name", "web1", "host web1 has the same name"),
    (1, "name", "Web-2", "[a-z][a-z0-9_]*"),
    (1, "count", 0, ">= 1"),
    (1, "count", True, "integer"),
    (1, "backup", "maybe", ""),
    (1, "fail_timeout", "soon", "duration"),
    (0, "max_fails", -1, ">= 0"),
])
def test_bad_host_value(tmp_path, index, key, value, reason):
    raw = data()
    raw["hosts"][index][key] = value
    message = error(tmp_path, raw)
    assert "hosts[%d].%s = %r: " % (index, key, value) in message
    assert reason in message


def test_host_structure_errors(tmp_path):
    raw = data()
    del raw["hosts"][1]["address"]
    assert "hosts[1].address = '': required key is missing" in error(tmp_path, raw)

    raw = data()
    raw["hosts"][0]["adress"] = "127.0.0.9:1"
    message = error(tmp_path, raw)
    assert "hosts[0].adress" in message and "did you mean hosts[0].address?" in message

    raw = data()
    raw["hosts"] = {"name": "web1", "address": "127.0.0.2:9000"}   # [hosts], not [[hosts]]
    assert "[[hosts]]" in error(tmp_path, raw)
    raw["hosts"] = []
    assert "[[hosts]]" in error(tmp_path, raw)

    raw = data(hosts=[dict(h, backup=True) for h in HOSTS])
    assert "every host is a backup" in error(tmp_path, raw)


def test_multi_host_needs_web_servers_and_no_shared_socket(tmp_path):
    raw = data()
    raw["nginx"] = {}
    message = error(tmp_path, raw)
    assert "nginx.web_servers = []" in message and "required with [[hosts]]" in message

    raw = data(workers={"socket": "tcp://127.0.0.1:9000"})
    message = error(tmp_path, raw)
    assert "workers.socket = 'tcp://127.0.0.1:9000'" in message and "remove workers.socket" in message


@pytest.mark.parametrize("bad", ["localhost", "10.0.0.0/8", "10.0.0.5 ", "10.0.0.5,10.0.0.6", 5])
def test_web_servers_are_ip_literals(tmp_path, bad):
    raw = data(nginx={"web_servers": ["127.0.0.1", bad]})
    assert "nginx.web_servers" in error(tmp_path, raw)


def test_web_servers_canonical(tmp_path):
    dep = parse(tmp_path, nginx={"web_servers": ["0:0::1", "127.0.0.1"]})
    assert dep.nginx.web_servers == ["::1", "127.0.0.1"]


#: Same payloads as test_settings: none may start a line, a directive or a section.
PAYLOADS = ["x\ny", "x]\n[program:evil]\ncommand=/bin/sh", "x;y", "x%(here)s", 'x"y', "x{y",
            "x}y", "x$y", "x#y", "x y", "x\\y", "x,y"]


@pytest.mark.parametrize("payload", PAYLOADS)
def test_injection_refused_in_host_values(tmp_path, payload):
    for key, value in (("name", payload), ("address", "127.0.0.9:9" + payload),
                       ("address", payload + "127.0.0.9:9")):
        raw = data()
        raw["hosts"][1][key] = value
        assert "hosts[1].%s" % key in error(tmp_path, raw)
    raw = data(nginx={"web_servers": ["127.0.0.1" + payload]})
    assert "nginx.web_servers" in error(tmp_path, raw)


# -- rendering ----------------------------------------------------------------

def test_front_view_renders_nginx_and_every_host(tmp_path):
    dep = parse(tmp_path, nginx={"connect_timeout": "1s"})
    files = render.render_all(dep, USER_HOST, dep.runtime_dir)
    assert sorted(files) == ["nginx-site.conf", "nginx.conf", "spare/supervisord.conf",
                             "web1/supervisord.conf", "web2/supervisord.conf"]
    site = files["nginx-site.conf"]
    assert ("    server 127.0.0.2:9000 max_fails=1 fail_timeout=10s;\n"
            "    server 127.0.0.3:9000 max_fails=1 fail_timeout=10s;\n"
            "    server 127.0.0.4:9000 max_fails=2 fail_timeout=2s backup;\n") in site
    assert "max_fails=0" not in site
    assert "fastcgi_next_upstream error timeout;" in site
    assert "non_idempotent" not in site.replace('"non_idempotent"', "")
    assert "fastcgi_next_upstream_tries 3;" in site
    assert "fastcgi_connect_timeout 1s;" in site
    assert "127.0.0.1,10.0.0.5 (nginx.web_servers)" in site
    assert "supervisord.conf" not in files, "the web server runs no workers"


@needs_nginx
def test_a_host_out_of_rotation_is_a_down_server_and_nginx_accepts_it(tmp_path):
    """A multi-host rollout's nginx files: only the web server's, the host marked down."""
    from dataclasses import replace
    dep = replace(parse(tmp_path), out_of_rotation=frozenset(["web2"]))
    files = render.web_server_files(dep, USER_HOST, dep.runtime_dir)
    assert sorted(files) == ["nginx-site.conf", "nginx.conf"]
    assert "    server 127.0.0.3:9000 max_fails=1 fail_timeout=10s down;\n" in files["nginx-site.conf"]
    assert files["nginx-site.conf"].count(" down;") == 1
    os.makedirs(dep.log_dir, exist_ok=True)
    render.write_atomic(files, dep.runtime_dir)
    r = subprocess.run([NGINX, "-t", "-c", os.path.join(dep.runtime_dir, "nginx.conf")],
                       capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL)
    assert r.returncode == 0, r.stderr


def test_single_host_site_unchanged(tmp_path):
    raw = data()
    del raw["hosts"]
    raw["nginx"] = {}
    dep = settings.parse(raw, str(tmp_path / "deploy.toml"))
    site = render.render_all(dep, USER_HOST, dep.runtime_dir)["nginx-site.conf"]
    assert "server unix:%s max_fails=0;" % dep.socket_path in site
    assert "fastcgi_next_upstream_tries" not in site


def supervisor_options(conf_path: str):
    from supervisor.options import ServerOptions
    options = ServerOptions()
    options.realize(args=["-c", conf_path])
    return options


def test_host_supervisord_conf_parses_with_supervisor(tmp_path):
    from supervisor.options import FastCGIGroupConfig

    front = parse(tmp_path, workers={"count": 2, "standby": 1}, metrics={"listen": "127.0.0.1:9100"})
    dep = front.for_host("web1")
    files = render.render_all(dep, USER_HOST, dep.runtime_dir)
    assert list(files) == ["supervisord.conf"]
    for d in (dep.runtime_dir, dep.log_dir, dep.app.directory):
        os.makedirs(d, exist_ok=True)
    with open(dep.supervisord_conf, "w") as f:
        f.write(files["supervisord.conf"])
    options = supervisor_options(dep.supervisord_conf)
    groups = {g.name: g for g in options.process_group_configs}
    assert set(groups) == {"wiki", "wiki_watchdog", "wiki_metrics"}, "no nginx on a worker host"
    fcgi = groups["wiki"]
    assert type(fcgi) is FastCGIGroupConfig
    # Bound to the host's own address only.
    assert fcgi.socket_config.url == "tcp://127.0.0.2:9000"
    assert fcgi.socket_config.addr() == ("127.0.0.2", 9000)
    assert [p.name for p in fcgi.process_configs] == ["wiki_%02d" % i for i in range(5)]
    p = fcgi.process_configs[2]
    # supervisor merges [supervisord] environment into each program's.
    assert p.environment == {"FCGI_TOOLKIT_SLOT": "2", "FCGI_TOOLKIT_DEPLOY": dep.path,
                             "FCGI_WEB_SERVER_ADDRS": "127.0.0.1,10.0.0.5", "FCGI_TOOLKIT_HOST": "web1"}
    assert p.stdout_logfile == os.path.join(dep.log_dir, "wiki_02.log")
    # Every child learns its host from supervisord's environment.
    assert options.configroot.supervisord.environment == {"FCGI_TOOLKIT_HOST": "web1"}
    for group in ("wiki_watchdog", "wiki_metrics"):
        assert groups[group].process_configs[0].environment["FCGI_TOOLKIT_HOST"] == "web1"
    assert options.identifier == "wiki_web1"
    # The control interface stays a private unix socket.
    (server,) = options.server_configs
    assert server["family"] == 1 and server["file"] == dep.control_socket and server["chmod"] == 0o700
    text = files["supervisord.conf"]
    assert "[inet_http_server]" not in text
    assert "\nhost = web1\n" in text, "the supervisorctl plugin is told its host"


def test_worker_host_reads_its_view_from_the_environment(tmp_path):
    """What a worker started by host web2's supervisord sees (env from the conf)."""
    path = write(tmp_path, data(workers={"count": 1}))
    env = dict(os.environ, FCGI_TOOLKIT_HOST="web2")
    code = ("from fcgi_toolkit import settings; d = settings.load(%r); "
            "print(d.host.name, d.workers.count, d.socket_url, d.runtime_dir)" % path)
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    front = settings.load(path, host="")
    assert r.stdout.split() == ["web2", "1", "tcp://127.0.0.3:9000", os.path.join(front.runtime_dir, "web2")]


def test_tcp_single_host_gets_the_allow_list(tmp_path):
    raw = {"app": {"name": "wiki", "wsgi": "a:b"}, "workers": {"socket": "tcp://127.0.0.1:9009"},
           "nginx": {"web_servers": ["127.0.0.1"]}}
    dep = settings.parse(raw, str(tmp_path / "deploy.toml"))
    text = render.render_all(dep, USER_HOST, dep.runtime_dir)["supervisord.conf"]
    assert ',FCGI_WEB_SERVER_ADDRS="127.0.0.1"\n' in text
    # Without web_servers a TCP socket takes any peer, and the conf says so.
    raw["nginx"] = {}
    dep = settings.parse(raw, str(tmp_path / "deploy.toml"))
    text = render.render_all(dep, USER_HOST, dep.runtime_dir)["supervisord.conf"]
    assert "FCGI_WEB_SERVER_ADDRS=" not in text and "EMPTY HERE" in text
    # On a unix socket the list would do nothing: refused rather than ignored.
    raw = {"app": {"name": "wiki", "wsgi": "a:b"}, "nginx": {"web_servers": ["127.0.0.1"]}}
    with pytest.raises(ConfigError) as info:          # settings.parse refuses it
        settings.parse(raw, str(tmp_path / "deploy.toml"))
    assert "nginx.web_servers" in str(info.value) and "TCP sockets only" in str(info.value)


def test_keepalive_bounded_by_the_smallest_host(tmp_path):
    hosts = [{"name": "big", "address": "127.0.0.2:9000", "count": 8},
             {"name": "small", "address": "127.0.0.3:9000", "count": 1}]
    with pytest.raises(ConfigError) as info:          # settings.parse refuses it
        parse(tmp_path, hosts=hosts, workers={"threads": 4}, nginx={"keepalive": 4})
    assert "nginx.keepalive = 4" in str(info.value) and "smallest host" in str(info.value)
    dep = parse(tmp_path, hosts=hosts, workers={"threads": 4}, nginx={"keepalive": 3})
    site = render.render_all(dep, USER_HOST, dep.runtime_dir)["nginx-site.conf"]
    assert "keepalive 3;" in site and "fastcgi_keep_conn on;" in site


# -- the render command ---------------------------------------------------------

def toolkit(*args, env=None, cwd=None):
    environ = dict(os.environ)
    environ.pop(settings.HOST_ENV, None)
    environ.update(env or {})
    return subprocess.run([sys.executable, "-m", "fcgi_toolkit", *args], capture_output=True, text=True,
                          timeout=60, env=environ, cwd=cwd)


def test_render_command_front_and_host(tmp_path):
    path = write(tmp_path, data())
    front = settings.load(path, host="")
    r = toolkit("render", "-c", path)
    assert r.returncode == 0, r.stderr
    expected = [os.path.join(front.runtime_dir, f) for f in ("nginx.conf", "nginx-site.conf")] + \
        [front.for_host(h).supervisord_conf for h in ("web1", "web2", "spare")]
    assert sorted(r.stdout.split()) == sorted(expected)
    assert all(os.path.isfile(p) for p in expected)

    out = tmp_path / "web2-out"
    r = toolkit("render", "-c", path, "--host", "web2", "-o", str(out))
    assert r.returncode == 0, r.stderr
    assert os.listdir(out) == ["supervisord.conf"]
    assert "socket=tcp://127.0.0.3:9000\n" in (out / "supervisord.conf").read_text()

    # FCGI_TOOLKIT_HOST selects the host as --host does.
    out = tmp_path / "env-out"
    r = toolkit("render", "-c", path, "-o", str(out), env={"FCGI_TOOLKIT_HOST": "spare"})
    assert r.returncode == 0, r.stderr
    assert "socket=tcp://127.0.0.4:9000\n" in (out / "supervisord.conf").read_text()

    r = toolkit("render", "-c", path, "--host", "web9", "-o", str(tmp_path / "none"))
    assert r.returncode == 2 and "host = 'web9'" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "none").exists()


def test_render_all_or_nothing_across_hosts(tmp_path):
    # The smallest host makes keepalive invalid: nothing at all is written.
    hosts = [{"name": "big", "address": "127.0.0.2:9000", "count": 4},
             {"name": "small", "address": "127.0.0.3:9000", "count": 1}]
    path = write(tmp_path, data(hosts=hosts, nginx={"keepalive": 2}))
    out = tmp_path / "out"
    r = toolkit("render", "-c", path, "-o", str(out))
    assert r.returncode == 2 and "nginx.keepalive" in r.stderr
    assert not out.exists() or not any(out.rglob("*"))


@needs_nginx
def test_nginx_accepts_the_multi_host_site(tmp_path):
    dep = parse(tmp_path, workers={"threads": 4}, nginx={"keepalive": 2, "location": "/wiki/"})
    os.makedirs(dep.log_dir, exist_ok=True)
    written = render.render(dep, host=USER_HOST)
    assert os.path.join(dep.runtime_dir, "nginx.conf") in written
    r = subprocess.run([NGINX, "-t", "-c", os.path.join(dep.runtime_dir, "nginx.conf")],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr


# -- the hosts' control ports (status on the web server) ----------------------

CONTROL = {"inet_port": "9001", "username": "ops", "password": "s3cret"}


def test_control_port_binds_each_hosts_own_address(tmp_path):
    front = parse(tmp_path, control=CONTROL)
    assert front.control.inet_port == "9001", "the front view keeps the port"
    assert [front.for_host(h).control.inet_port for h in ("web1", "web2", "spare")] == [
        "127.0.0.2:9001", "127.0.0.3:9001", "127.0.0.4:9001"]
    # Off by default: no TCP control port anywhere.
    assert parse(tmp_path).for_host("web1").control.inet_port == ""


@pytest.mark.parametrize("control,hosts,key,reason", [
    (dict(CONTROL, inet_port="0.0.0.0:9001"), None, "control.inet_port", "give a port only"),
    (dict(CONTROL, inet_port="127.0.0.2:9001"), None, "control.inet_port", "give a port only"),
    (dict(CONTROL, inet_port="9000"), None, "hosts[0].address", "its port is control.inet_port too"),
    (dict(CONTROL, password=""), None, "control.inet_port", "needs control.username and control.password"),
    (CONTROL, [{"name": "a", "address": "127.0.0.2:9000"}, {"name": "b", "address": "127.0.0.2:9002"}],
     "hosts[1].address", "host a has the same IP"),
])
def test_bad_host_control(tmp_path, control, hosts, key, reason):
    message = error(tmp_path, data(hosts, control=control))
    assert (": %s = " % key) in message and reason in message


def test_hosts_may_share_an_ip_without_control_port(tmp_path):
    hosts = [{"name": "a", "address": "127.0.0.2:9000"}, {"name": "b", "address": "127.0.0.2:9002"}]
    assert len(parse(tmp_path, hosts=hosts).hosts) == 2


def test_host_conf_control_port_with_credentials(tmp_path):
    front = parse(tmp_path, control=CONTROL)
    dep = front.for_host("web2")
    files = render.render_all(dep, USER_HOST, dep.runtime_dir)
    for d in (dep.runtime_dir, dep.log_dir, dep.app.directory):
        os.makedirs(d, exist_ok=True)
    with open(dep.supervisord_conf, "w") as f:
        f.write(files["supervisord.conf"])
    options = supervisor_options(dep.supervisord_conf)
    by_family = {s["family"]: s for s in options.server_configs}
    assert by_family[1]["file"] == dep.control_socket      # the unix socket stays
    inet = by_family[2]                                    # AF_INET
    assert (inet["host"], inet["port"]) == ("127.0.0.3", 9001), "the host's own address"
    assert (inet["username"], inet["password"]) == ("ops", "s3cret")
    # The web server's own files carry no credentials.
    web_files = render.render_all(front, USER_HOST, front.runtime_dir)
    assert not any("s3cret" in text for name, text in web_files.items()
                   if not name.endswith("supervisord.conf"))
