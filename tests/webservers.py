"""Apache, lighttpd and Caddy for the integration tests: each runs as a
non-daemon child on the cluster's loopback port, in a temporary directory,
with a small main configuration that includes the site file fcgi-toolkit
rendered (apache-site.conf, lighttpd-site.conf, Caddyfile).  Never the
system service.

    with Cluster(tmp, web={"server": "apache"}, nginx={"managed": False}) as c, \\
            WebServer("apache", c) as web:
        c.get("/")

When run as root, Apache and lighttpd drop to www-data (Apache refuses to
serve as root): :func:`cluster_sections` gives the socket that group and
makes the runtime dir traversable, as a deployment would.
"""
from __future__ import annotations

import grp
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
from typing import Any, Optional

from harness import port_open, wait_for

KINDS = ("apache", "lighttpd", "caddy")
BINARIES = {"apache": "apache2", "lighttpd": "lighttpd", "caddy": "caddy"}
SITE_FILES = {"apache": "apache-site.conf", "lighttpd": "lighttpd-site.conf", "caddy": "Caddyfile"}
APACHE_MODULES = "/usr/lib/apache2/modules"
#: The unprivileged user Debian's Apache and lighttpd run as.
WEB_USER = "www-data"


def binary(kind: str) -> str:
    path = os.environ.get("PATH", os.defpath) + os.pathsep + "/usr/sbin:/sbin"
    return shutil.which(BINARIES[kind], path=path) or ""


def dropping_privileges() -> bool:
    """Whether the servers run as WEB_USER (we are root and the user exists)."""
    if os.geteuid() != 0:
        return False
    try:
        grp.getgrnam(WEB_USER)
    except KeyError:
        return False
    return True


def cluster_sections(kind: str, **sections: Any) -> dict:
    """Cluster keyword arguments for ``kind``: web.server, no managed nginx,
    the socket's group the web server's when it drops privileges."""
    out = {name: dict(table) for name, table in sections.items()}
    out.setdefault("web", {})["server"] = kind
    out.setdefault("nginx", {})["managed"] = False
    if dropping_privileges() and kind != "caddy":
        out.setdefault("workers", {}).setdefault("socket_owner", "root:%s" % WEB_USER)
    return out


def _apache_conf(root: str, site: str, drop: bool) -> str:
    modules = ["mpm_event", "authz_core", "proxy", "proxy_fcgi", "alias", "mime"]
    lines = ["ServerRoot %s" % root, "ServerName localhost", "DefaultRuntimeDir %s" % root,
             "PidFile %s/httpd.pid" % root, "Mutex file:%s default" % root,
             "ErrorLog %s/error.log" % root, "LogLevel warn",
             'LogFormat "%h %>s %r" short', "CustomLog %s/access.log short" % root]
    lines += ["LoadModule %s_module %s/mod_%s.so" % (m, APACHE_MODULES, m) for m in modules]
    if os.path.exists("/etc/mime.types"):
        lines.append("TypesConfig /etc/mime.types")
    if drop:
        lines += ["User %s" % WEB_USER, "Group %s" % WEB_USER]
    lines.append("Include %s" % site)
    return "\n".join(lines) + "\n"


def _lighttpd_conf(root: str, site: str, port: int, drop: bool) -> str:
    lines = ['server.document-root = "%s/www"' % root, 'server.bind = "127.0.0.1"',
             "server.port = %d" % port, 'server.errorlog = "%s/error.log"' % root,
             'server.pid-file = "%s/lighttpd.pid"' % root,
             'server.modules = ( "mod_accesslog" )',
             'accesslog.filename = "%s/access.log"' % root,
             'accesslog.format = "%%h %%>s %%r"']
    if drop:
        lines += ['server.username = "%s"' % WEB_USER, 'server.groupname = "%s"' % WEB_USER]
    lines.append('include "%s"' % site)
    return "\n".join(lines) + "\n"


def _caddy_conf(root: str, site: str) -> str:
    return ("{\n\tadmin off\n\tlog {\n\t\toutput file %s/caddy.log\n\t}\n}\n\nimport %s\n"
            % (root, site))


class WebServer:
    """One web server child serving the cluster's rendered site file."""

    def __init__(self, kind: str, cluster: Any, site: Optional[str] = None):
        self.kind = kind
        self.cluster = cluster
        self.port = cluster.port
        # Its own short directory, readable by the web server's user (a
        # test's tmp_path is not); the logs are copied next to the
        # cluster's on stop().
        self.root = tempfile.mkdtemp(prefix="fct-%s-" % kind)
        os.chmod(self.root, 0o755)
        self.log_copy = os.path.join(cluster.base_dir, kind)
        self.site = site or os.path.join(cluster.dep.runtime_dir, SITE_FILES[kind])
        self.proc: Optional[subprocess.Popen] = None

    def command(self) -> list[str]:
        drop = dropping_privileges()
        os.makedirs(os.path.join(self.root, "www"), exist_ok=True)
        conf = os.path.join(self.root, "main.conf")
        if self.kind == "apache":
            text = _apache_conf(self.root, self.site, drop)
            cmd = [binary("apache"), "-DFOREGROUND", "-f", conf]
        elif self.kind == "lighttpd":
            text = _lighttpd_conf(self.root, self.site, self.port, drop)
            cmd = [binary("lighttpd"), "-D", "-f", conf]
        else:
            text = _caddy_conf(self.root, self.site)
            cmd = [binary("caddy"), "run", "--config", conf, "--adapter", "caddyfile"]
        with open(conf, "w", encoding="utf-8") as f:
            f.write(text)
        if drop:
            # The web server's user writes its logs here and reaches the socket
            # through the runtime dir (a deployment puts both in place).
            os.chown(self.root, pwd.getpwnam(WEB_USER).pw_uid, -1)
            os.chmod(self.cluster.dep.runtime_dir, 0o711)
        return cmd

    def start(self) -> "WebServer":
        cmd = self.command()
        env = dict(os.environ, HOME=self.root, XDG_DATA_HOME=self.root, XDG_CONFIG_HOME=self.root)
        self._out = open(os.path.join(self.root, "stdout.log"), "wb")
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=self._out,
                                     stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            wait_for(self._up, 20, "%s on port %d" % (self.kind, self.port))
        except BaseException:
            self.stop()
            raise
        return self

    def _up(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise RuntimeError("%s exited with %s:\n%s" % (self.kind, self.proc.returncode, self.logs()))
        return port_open(self.port)

    def logs(self) -> str:
        parts = []
        for name in ("stdout.log", "error.log", "caddy.log"):
            path = os.path.join(self.root, name)
            if os.path.exists(path):
                with open(path, encoding="utf-8", errors="replace") as f:
                    parts.append("----- %s %s -----\n%s" % (self.kind, name, f.read()[-4000:]))
        return "\n".join(parts)

    def stop(self) -> None:
        if self.proc is None:
            return
        proc, self.proc = self.proc, None
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)
        self._out.close()
        shutil.copytree(self.root, self.log_copy, dirs_exist_ok=True,
                        ignore=shutil.ignore_patterns("*.sock", "*.pid", "www", "caddy"))
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> "WebServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
