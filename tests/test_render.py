"""Rendering: every supervisord.conf is read back by supervisor's own parser,
every nginx config is checked with ``nginx -t``; rendering is all or nothing."""
from __future__ import annotations

import os
import re
import subprocess

import pytest
from hypothesis import HealthCheck, given, settings as hsettings, strategies as st

from fcgi_toolkit import render, settings
from fcgi_toolkit.settings import ConfigError
from harness import toml_dumps

NGINX = render.find_nginx()
needs_nginx = pytest.mark.skipif(not NGINX, reason="nginx is not on PATH (or in /usr/sbin)")

ROOT_HOST = render.Host(euid=0, user="root", nginx_binary="/usr/sbin/nginx", mime_types="")
USER_HOST = render.Host(euid=1000, user="alice", nginx_binary="/usr/sbin/nginx", mime_types="")


def deployment(tmp_path, **sections) -> settings.Deployment:
    data = {"app": {"name": "wiki", "wsgi": "wikiapp:application"}}
    for section, table in sections.items():
        data.setdefault(section, {}).update(table)
    path = tmp_path / "deploy.toml"
    path.write_text(toml_dumps(data))
    return settings.load(str(path))


def rendered(tmp_path, host=USER_HOST, **sections):
    dep = deployment(tmp_path, **sections)
    files = render.render_all(dep, host, dep.runtime_dir)
    return dep, files


def supervisor_parse(dep: settings.Deployment, conf_text: str):
    """Write the conf and read it with supervisord's own option parser."""
    from supervisor.options import ServerOptions

    os.makedirs(dep.runtime_dir, exist_ok=True)
    os.makedirs(dep.log_dir, exist_ok=True)
    os.makedirs(dep.app.directory, exist_ok=True)
    with open(dep.supervisord_conf, "w") as f:
        f.write(conf_text)
    options = ServerOptions()
    options.realize(args=["-c", dep.supervisord_conf])
    return options


def test_supervisord_conf_parses_with_supervisor(tmp_path):
    from supervisor.options import EventListenerPoolConfig, FastCGIGroupConfig, ProcessGroupConfig

    dep, files = rendered(tmp_path, workers={"count": 3, "standby": 2, "graceful_timeout": 7.5})
    options = supervisor_parse(dep, files["supervisord.conf"])
    groups = {g.name: g for g in options.process_group_configs}
    assert set(groups) == {"wiki", "wiki_watchdog", "wiki_nginx"}

    fcgi = groups["wiki"]
    assert type(fcgi) is FastCGIGroupConfig
    assert fcgi.socket_config.url == dep.socket_url
    assert fcgi.socket_config.get_mode() == 0o660
    names = [p.name for p in fcgi.process_configs]
    assert names == ["wiki_%02d" % i for i in range(7)]     # 3 + 2 standbys + a spare slot each
    p = fcgi.process_configs[1]
    assert p.command == "%s -m fcgi_toolkit worker -c %s --slot 1" % (dep.python, dep.path)
    from supervisor.datatypes import RestartUnconditionally
    assert p.autostart is False and p.autorestart is RestartUnconditionally
    assert p.stopsignal == 15 and p.stopwaitsecs == 13  # ceil(7.5) + 5
    assert p.stopasgroup and p.killasgroup and p.redirect_stderr
    assert p.directory == dep.app.directory
    assert p.stdout_logfile == os.path.join(dep.log_dir, "wiki_01.log")
    assert p.environment == {"FCGI_TOOLKIT_SLOT": "1", "FCGI_TOOLKIT_DEPLOY": dep.path}
    assert p.uid is None
    # Shutdown order (highest priority first): nginx, then the watchdog, then the workers.
    assert fcgi.priority < groups["wiki_watchdog"].priority < groups["wiki_nginx"].priority

    listener = groups["wiki_watchdog"]
    assert type(listener) is EventListenerPoolConfig
    assert listener.buffer_size == 1024
    lp = listener.process_configs[0]
    assert lp.command == "%s -m fcgi_toolkit listener -c %s" % (dep.python, dep.path)
    assert lp.stderr_logfile == os.path.join(dep.log_dir, "wiki_watchdog.log")
    from supervisor.events import EventTypes
    assert set(listener.pool_events) == {EventTypes.PROCESS_STATE, EventTypes.TICK_5}

    nginx = groups["wiki_nginx"]
    assert type(nginx) is ProcessGroupConfig
    np_ = nginx.process_configs[0]
    # Through the lifeline wrapper: nginx gets QUIT when supervisord dies (issue #13).
    assert np_.command == ("%s -m fcgi_toolkit lifeline --pidfile %s --signal QUIT -- "
                           "/usr/sbin/nginx -c %s/nginx.conf"
                           % (dep.python, dep.supervisord_pidfile, dep.runtime_dir))
    assert np_.stopsignal == 3 and np_.autorestart is RestartUnconditionally

    (server,) = options.server_configs
    assert server["family"] == 1 and server["file"] == dep.control_socket  # AF_UNIX
    assert server["chmod"] == 0o700
    assert options.pidfile == dep.supervisord_pidfile == os.path.join(dep.runtime_dir, "supervisord.pid")
    assert options.nodaemon is False, "nodaemon is given on the command line by `run`, not in the file"
    text = files["supervisord.conf"]
    sections = re.findall(r"^\[([^\]]+)\]", text, re.M)
    assert not [s for s in sections if s.startswith("group:")], "a [group:x] would drop the socket"
    assert "inet_http_server" not in sections
    assert "[ctlplugin:fcgi]" in text and "deploy = %s" % dep.path in text


def test_optional_sections(tmp_path):
    dep, files = rendered(tmp_path, nginx={"managed": False}, metrics={"listen": "127.0.0.1:9117"},
                          control={"inet_port": "9001", "username": "admin", "password": "[program:x]{$}"},
                          workers={"user": "nobody", "socket_owner": "nobody:nogroup", "socket_mode": "0640"})
    options = supervisor_parse(dep, files["supervisord.conf"])
    groups = {g.name: g for g in options.process_group_configs}
    assert set(groups) == {"wiki", "wiki_watchdog", "wiki_metrics"}
    assert groups["wiki_metrics"].process_configs[0].command == (
        "%s -m fcgi_toolkit metrics -c %s" % (dep.python, dep.path))
    fcgi = groups["wiki"]
    import pwd
    nobody = pwd.getpwnam("nobody")
    assert fcgi.process_configs[0].uid == nobody.pw_uid
    assert fcgi.socket_config.get_mode() == 0o640
    assert fcgi.socket_config.get_owner()[0] == nobody.pw_uid
    inet = [s for s in options.server_configs if s["section"] == "inet_http_server"]
    assert len(inet) == 1
    assert inet[0]["host"] == "127.0.0.1" and inet[0]["port"] == 9001  # a bare port stays on loopback
    assert inet[0]["username"] == "admin" and inet[0]["password"] == "[program:x]{$}"


def test_tcp_socket(tmp_path):
    dep, files = rendered(tmp_path, workers={"socket": "tcp://127.0.0.1:9009"})
    options = supervisor_parse(dep, files["supervisord.conf"])
    fcgi = [g for g in options.process_group_configs if g.name == "wiki"][0]
    assert fcgi.socket_config.url == "tcp://127.0.0.1:9009"
    assert "server 127.0.0.1:9009 max_fails=0;" in files["nginx-site.conf"]


def test_tcp_socket_with_owner_is_refused(tmp_path):
    # Refused by settings.parse (so by every command, the worker and the listener too).
    with pytest.raises(ConfigError, match="workers.socket_owner"):
        deployment(tmp_path, workers={"socket": "tcp://127.0.0.1:9009", "socket_owner": "www-data"})


def test_ipv6_control_port_is_refused(tmp_path):
    # supervisor's inet_http_server binds AF_INET only.
    with pytest.raises(ConfigError, match="control.inet_port"):
        deployment(tmp_path, control={"inet_port": "[::1]:9001", "username": "a", "password": "b"})


def test_keepalive_needs_spare_threads(tmp_path):
    with pytest.raises(ConfigError, match="nginx.keepalive = 2"):
        deployment(tmp_path, nginx={"keepalive": 2}, workers={"count": 2, "threads": 1})
    dep, files = rendered(tmp_path, nginx={"keepalive": 2}, workers={"count": 2, "threads": 4})
    site = files["nginx-site.conf"]
    assert "keepalive 2;" in site and "fastcgi_keep_conn on;" in site


def test_nginx_site_for_root_location(tmp_path):
    dep, files = rendered(tmp_path, nginx={"static": {"/static/": "static", "/media/": "/srv/media/"}})
    site = files["nginx-site.conf"]
    assert "server unix:%s max_fails=0;" % dep.socket_path in site
    # No $uri (normalised): the worker derives the paths from REQUEST_URI.
    assert "fastcgi_param SCRIPT_NAME" not in site and "fastcgi_param PATH_INFO" not in site
    # No upstream connection cache by default; keep_conn is always on so that
    # nginx needs FCGI_END_REQUEST to call a response complete.
    assert not re.search(r"^\s*keepalive ", site, re.M) and "fastcgi_keep_conn on;" in site
    assert "alias %s/;" % (tmp_path / "static") in site and "alias /srv/media/;" in site
    assert "include" not in site, "no distribution fastcgi_params"
    for param in ("REQUEST_METHOD", "QUERY_STRING", "CONTENT_TYPE", "CONTENT_LENGTH", "REQUEST_URI",
                  "DOCUMENT_URI", "SERVER_PROTOCOL", "REQUEST_SCHEME", "HTTPS", "GATEWAY_INTERFACE",
                  "SERVER_SOFTWARE", "REMOTE_ADDR", "REMOTE_PORT", "SERVER_ADDR", "SERVER_PORT",
                  "SERVER_NAME"):
        assert "fastcgi_param %s " % param in site
    assert "fastcgi_connect_timeout 5s;" in site and "fastcgi_read_timeout 60s;" in site
    assert "fastcgi_next_upstream error timeout;" in site
    assert "client_max_body_size 16777216;" in site


def test_nginx_site_for_prefix(tmp_path):
    dep, files = rendered(tmp_path, nginx={"location": "/my.wiki/", "read_timeout": 2.5})
    site = files["nginx-site.conf"]
    assert "location /my.wiki/ {" in site
    assert "location = /my.wiki {\n        return 301 /my.wiki/;" in site
    # The worker derives SCRIPT_NAME and PATH_INFO from REQUEST_URI.
    assert "fastcgi_param REQUEST_URI $request_uri;" in site
    assert "fastcgi_param SCRIPT_NAME" not in site and "fastcgi_param PATH_INFO" not in site
    assert "fastcgi_read_timeout 2500ms;" in site


def test_nginx_user_only_when_root_and_never_root(tmp_path):
    _, files = rendered(tmp_path, host=USER_HOST)
    assert "\nuser " not in files["nginx.conf"]
    # Root, default socket: nginx runs as the dedicated web user, the socket
    # gets that user's group (mode 0660 lets nginx in).
    dep, files = rendered(tmp_path, host=ROOT_HOST)
    assert "\nuser www-data www-data;" in files["nginx.conf"]
    fcgi = fcgi_group(dep, files)
    import grp
    assert fcgi.socket_config.get_owner() == (0, grp.getgrnam("www-data").gr_gid)
    # The socket's owner (workers.user is supervisord's default owner) opens it itself.
    _, files = rendered(tmp_path, host=ROOT_HOST, workers={"user": "nobody"})
    assert "\nuser nobody nogroup;" in files["nginx.conf"]
    assert "socket_owner=" not in files["supervisord.conf"]
    _, files = rendered(tmp_path, host=ROOT_HOST, workers={"socket_owner": "www-data:adm"})
    assert "\nuser www-data adm;" in files["nginx.conf"]
    # A root-owned socket with the operator's group: nginx joins that group.
    _, files = rendered(tmp_path, host=ROOT_HOST, workers={"socket_owner": "root:adm"})
    assert "\nuser www-data adm;" in files["nginx.conf"]
    assert "socket_owner=root:adm" in files["supervisord.conf"]
    # TCP: no socket permissions, still never root.
    _, files = rendered(tmp_path, host=ROOT_HOST, workers={"socket": "tcp://127.0.0.1:9009"})
    assert "\nuser www-data www-data;" in files["nginx.conf"]
    for _, text in files.items():
        assert "user root" not in text


def fcgi_group(dep, files):
    options = supervisor_parse(dep, files["supervisord.conf"])
    return [g for g in options.process_group_configs if g.name == dep.name][0]


def test_socket_mode_must_let_a_root_started_nginx_in(tmp_path):
    dep = deployment(tmp_path, workers={"socket_mode": "0600"})
    render.render_all(dep, USER_HOST, dep.runtime_dir)   # nginx runs as the socket's owner
    with pytest.raises(ConfigError, match=r"workers.socket_mode = '0600': nginx's workers run as "
                                          r"www-data \(group www-data\).*group bits"):
        render.render_all(dep, ROOT_HOST, dep.runtime_dir)
    dep = deployment(tmp_path, workers={"socket_mode": "0600", "socket_owner": "www-data"})
    render.render_all(dep, ROOT_HOST, dep.runtime_dir)   # owner bits: fine


def test_unknown_socket_owner_is_one_line(tmp_path):
    dep = deployment(tmp_path, workers={"socket_owner": "no_such_user_x"})
    with pytest.raises(ConfigError, match="workers.socket_owner = 'no_such_user_x': no such user"):
        render.render_all(dep, ROOT_HOST, dep.runtime_dir)


@pytest.mark.parametrize("socket", ["tcp://0.0.0.0:9000", "tcp://10.1.2.3:9000", "tcp://[::]:9000",
                                    "tcp://app.example.com:9000"])
def test_exposed_tcp_socket_needs_web_servers(tmp_path, socket):
    # A cross-setting rule: settings.parse refuses the file (every command, the worker too).
    with pytest.raises(ConfigError) as info:
        deployment(tmp_path, workers={"socket": socket})
    message = str(info.value)
    assert message.startswith("%s: workers.socket = %r: " % (tmp_path / "deploy.toml", socket))
    assert "nginx.web_servers" in message and "\n" not in message
    dep, files = rendered(tmp_path, workers={"socket": socket}, nginx={"web_servers": ["10.0.0.5"]})
    assert 'FCGI_WEB_SERVER_ADDRS="10.0.0.5"' in files["supervisord.conf"]


@pytest.mark.parametrize("socket", ["tcp://127.0.0.1:9000", "tcp://127.3.0.1:9000", "tcp://[::1]:9000",
                                    "tcp://localhost:9000"])
def test_loopback_tcp_socket_needs_no_web_servers(tmp_path, socket):
    rendered(tmp_path, workers={"socket": socket})


SMALL_HOST = render.Host(euid=1000, user="alice", nginx_binary="/usr/sbin/nginx", mime_types="",
                         cpus=2, memory=4 << 30)


def test_count_above_memory_is_refused(tmp_path):
    # 2 GB per worker, 2 + 2 (recycle.max_concurrent replacements) alive at the peak: 8 GB > 4 GB.
    dep = deployment(tmp_path, workers={"count": 2}, limits={"max_rss": "2GB"})
    with pytest.raises(ConfigError, match=r"workers.count = 2: at the peak of a recycle 4 workers "
                                          r"run, limits.max_rss = 2GB each: 8GB"):
        render.render_all(dep, SMALL_HOST, dep.runtime_dir)
    dep = deployment(tmp_path, workers={"count": 2}, limits={"max_rss": "1GB"})
    render.render_all(dep, SMALL_HOST, dep.runtime_dir)
    # Without max_rss, a worker's own memory still bounds the count.
    dep = deployment(tmp_path, workers={"count": 100000})
    with pytest.raises(ConfigError, match="workers.count = 100000: .*an idle worker's own memory"):
        render.render_all(dep, SMALL_HOST, dep.runtime_dir)
    # Unknown memory: no check.
    render.render_all(dep, USER_HOST, dep.runtime_dir)


def test_count_above_cpus_is_a_warning(tmp_path):
    dep = deployment(tmp_path, workers={"count": 9})
    render.render_all(dep, SMALL_HOST, dep.runtime_dir)
    assert "workers.count = 9 is more than 4 x this machine's 2 CPUs" in render.capacity_warning(dep, SMALL_HOST)
    assert render.capacity_warning(deployment(tmp_path, workers={"count": 8}), SMALL_HOST) == ""


def test_mime_types_included_or_shipped(tmp_path):
    _, files = rendered(tmp_path)
    assert "types {" in files["nginx.conf"] and "text/css css;" in files["nginx.conf"]
    host = render.Host(euid=1000, user="alice", nginx_binary="nginx", mime_types="/etc/nginx/mime.types")
    _, files = rendered(tmp_path, host=host)
    assert "include /etc/nginx/mime.types;" in files["nginx.conf"]


def nginx_test(conf_path: str) -> subprocess.CompletedProcess:
    return subprocess.run([NGINX, "-t", "-c", conf_path], capture_output=True, text=True, timeout=30)


@needs_nginx
@pytest.mark.parametrize("sections", [
    {},
    {"nginx": {"location": "/wiki/", "static": {"/static/": "static"}, "server_name": "example.org www.example.org"}},
    {"nginx": {"keepalive": 4, "listen": "[::1]:8089"}, "workers": {"threads": 4}},
    {"workers": {"socket": "tcp://127.0.0.1:9009"}, "nginx": {"listen": "8089"}},
], ids=["default", "prefix-static", "keepalive-v6", "tcp"])
def test_nginx_accepts_standalone_and_included_site(tmp_path, sections):
    dep = deployment(tmp_path, **sections)
    os.makedirs(dep.log_dir, exist_ok=True)
    (tmp_path / "static").mkdir(exist_ok=True)
    written = render.render(dep)
    assert sorted(os.path.basename(p) for p in written) == ["nginx-site.conf", "nginx.conf", "supervisord.conf"]
    r = nginx_test(os.path.join(dep.runtime_dir, "nginx.conf"))
    assert r.returncode == 0, r.stderr

    # The site file included into a minimal nginx.conf, as into a system nginx.
    minimal = tmp_path / "minimal.conf"
    minimal.write_text(
        "pid %s/t.pid;\nerror_log %s/t.log;\nevents {}\nhttp {\n"
        "    client_body_temp_path %s/t_body;\n    fastcgi_temp_path %s/t_fcgi;\n"
        "    include %s/nginx-site.conf;\n}\n" % ((tmp_path,) * 4 + (dep.runtime_dir,)))
    r = nginx_test(str(minimal))
    assert r.returncode == 0, r.stderr


def test_render_writes_nothing_on_error(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "supervisord.conf").write_text("old\n")
    templates = tmp_path / "tpl"
    templates.mkdir()
    (templates / "nginx-site.conf.j2").write_text("{{ no_such_variable }}\n")
    dep = deployment(tmp_path, runtime={"templates": "tpl"})
    with pytest.raises(ConfigError, match="no_such_variable"):
        render.render(dep, str(out), host=USER_HOST)
    assert sorted(os.listdir(out)) == ["supervisord.conf"]
    assert (out / "supervisord.conf").read_text() == "old\n"


def test_user_templates_override_builtin(tmp_path):
    templates = tmp_path / "tpl"
    templates.mkdir()
    (templates / "nginx-site.conf.j2").write_text("# custom site for {{ app.name }}\n")
    dep = deployment(tmp_path, runtime={"templates": "tpl"})
    files = render.render_all(dep, USER_HOST, dep.runtime_dir)
    assert files["nginx-site.conf"] == "# custom site for wiki\n"
    assert files["supervisord.conf"].startswith("; supervisord.conf for wiki")


def test_render_to_another_directory_points_at_it(tmp_path):
    dep = deployment(tmp_path)
    out = tmp_path / "out"
    render.render(dep, str(out), host=USER_HOST)
    assert "include %s/nginx-site.conf;" % out in (out / "nginx.conf").read_text()
    assert "-c %s/nginx.conf" % out in (out / "supervisord.conf").read_text()


def test_supervisord_conf_with_control_password_is_private(tmp_path):
    plain = deployment(tmp_path)
    render.render(plain, str(tmp_path / "plain"), host=USER_HOST)
    assert (tmp_path / "plain" / "supervisord.conf").stat().st_mode & 0o777 == 0o644
    secret = deployment(tmp_path, control={"inet_port": "9001", "username": "ops",
                                           "password": "s3cret-pass"})
    render.render(secret, str(tmp_path / "secret"), host=USER_HOST)
    conf = tmp_path / "secret" / "supervisord.conf"
    assert "password=s3cret-pass" in conf.read_text()
    assert conf.stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "secret" / "nginx.conf").stat().st_mode & 0o777 == 0o644


_SAFE = st.text(alphabet="abcXYZ019_.@+~=,:-", min_size=1, max_size=12).filter(
    lambda s: s not in (".", "..") and not s.startswith("~"))


@hsettings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(segment=_SAFE)
def test_any_allowed_path_reads_back_unchanged(tmp_path_factory, segment):
    # Every character the allow-list admits reaches supervisord unaltered:
    # nothing in the rendered file needs escaping.
    base = tmp_path_factory.mktemp("p")
    app_dir = base / segment
    dep = deployment(base, app={"directory": str(app_dir)}, runtime={"dir": str(base / "rt" / segment)})
    files = render.render_all(dep, USER_HOST, dep.runtime_dir)
    options = supervisor_parse(dep, files["supervisord.conf"])
    fcgi = [g for g in options.process_group_configs if g.name == "wiki"][0]
    assert fcgi.process_configs[0].directory == str(app_dir)
    assert fcgi.socket_config.url == dep.socket_url
    assert fcgi.process_configs[0].command.endswith("-c %s --slot 0" % dep.path)


@pytest.mark.parametrize("server, site", [("apache", "apache-site.conf"),
                                          ("lighttpd", "lighttpd-site.conf"), ("caddy", "Caddyfile")])
def test_other_web_servers_render_their_site_file_only(tmp_path, server, site):
    dep, files = rendered(tmp_path, web={"server": server},
                          nginx={"managed": False, "location": "/my.wiki/", "read_timeout": 2.5,
                                 "client_max_body_size": "5MB", "static": {"/static/": "/srv/media/"}})
    assert sorted(files) == sorted(["supervisord.conf", site])
    text = files[site]
    assert dep.socket_path in text and "/my.wiki/" in text and "/srv/media" in text
    assert "SCRIPT_NAME and PATH_INFO: the worker derives both from REQUEST_URI" in text
    limit = {"apache": "LimitRequestBody 5242880", "lighttpd": "server.max-request-size = 5120",
             "caddy": "max_size 5242880"}[server]
    timeout = {"apache": "timeout=3 ", "lighttpd": '"read-timeout" => 3,',
               "caddy": "read_timeout 2500ms"}[server]
    assert limit in text and timeout in text
    assert "[program:my_nginx]" not in files["supervisord.conf"] and "_nginx]" not in files["supervisord.conf"]


def test_nginx_site_only_for_nginx(tmp_path):
    _, files = rendered(tmp_path)
    assert sorted(files) == ["nginx-site.conf", "nginx.conf", "supervisord.conf"]


@pytest.mark.parametrize("sections, message", [
    ({"web": {"server": "caddy"}}, "web.server = 'caddy': nginx.managed = true runs nginx"),
])
def test_other_web_server_with_managed_nginx_is_refused(tmp_path, sections, message):
    with pytest.raises(settings.ConfigError, match=re.escape(message)):
        rendered(tmp_path, **sections)
