"""The renderer: deployment -> supervisord.conf and the web server's site file.

nginx: nginx-site.conf (and nginx.conf, for a managed nginx); Apache:
apache-site.conf; lighttpd: lighttpd-site.conf; Caddy: Caddyfile
(``web.server``).

Command ``render -c deploy.toml [-o DIR] [--host NAME]``.  Rendering is all
or nothing: every file is rendered in memory first, then each is written to
a temporary file in DIR and moved into place with ``os.replace``; on any
error no file is written.

Several hosts (``[[hosts]]`` in the deployment file):

* without ``--host``: the web server's files, ``DIR/nginx-site.conf`` (one
  upstream with every host) and ``DIR/nginx.conf``, plus every host's
  ``DIR/<host>/supervisord.conf``.  With the default DIR (runtime.dir) each
  host's file lands in that host's own runtime dir, where ``fcgi-toolkit
  run`` on that host (FCGI_TOOLKIT_HOST=<host>) expects it.
* ``--host NAME``: that host's ``supervisord.conf`` only, into DIR (default:
  the host's runtime dir, ``<runtime.dir>/<host>``).  Host configs never run
  nginx: nginx runs on the web server.

Templates are jinja2 with StrictUndefined (a missing variable is an error,
never an empty string).  They are looked up in ``runtime.templates`` first
(user overrides, same file names), then in the built-in templates: the
installed package ``fcgi_toolkit.templates`` or, in a checkout, the
repository's ``templates/`` directory.
"""
from __future__ import annotations

import argparse
import math
import os
import pwd
import re
import shutil
import tempfile
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Mapping, Optional

from fcgi_toolkit import names, settings, webuser
from fcgi_toolkit.settings import ConfigError, Deployment

if TYPE_CHECKING:
    import jinja2

#: Rendered file name -> template name.
FILES: Mapping[str, str] = {
    "supervisord.conf": "supervisord.conf.j2",
    "nginx.conf": "nginx.conf.j2",
    "nginx-site.conf": "nginx-site.conf.j2",
    "apache-site.conf": "apache-site.conf.j2",
    "lighttpd-site.conf": "lighttpd-site.conf.j2",
    "Caddyfile": "Caddyfile.j2",
}

#: The web server's files for each ``web.server``.
SITE_FILES: Mapping[str, tuple] = {
    "nginx": ("nginx.conf", "nginx-site.conf"),
    "apache": ("apache-site.conf",),
    "lighttpd": ("lighttpd-site.conf",),
    "caddy": ("Caddyfile",),
}

#: The least memory one worker takes (an idle worker of the demo app is
#: about 20 MB resident; see README "Safe defaults").
MIN_WORKER_RSS = 16 * 1024 * 1024

#: Workers per CPU above which check and run warn.
CPU_FACTOR = 4

#: Where a distribution keeps nginx's MIME map; the standalone nginx.conf
#: includes it when present and ships a small map otherwise.
SYSTEM_MIME_TYPES = "/etc/nginx/mime.types"

# nginx is often in sbin, which is not on a normal user's PATH.
_NGINX_SEARCH = ("/usr/sbin", "/usr/local/sbin", "/sbin", "/usr/local/nginx/sbin")


@dataclass(frozen=True)
class Host:
    """Facts about the machine that the rendered files depend on.

    Gathered once by :func:`Host.probe`; tests pass their own.
    """
    euid: int
    user: str
    nginx_binary: str
    mime_types: str
    #: The dedicated unprivileged user (and its primary group) nginx's
    #: workers run as when nginx is started by root (see fcgi_toolkit.webuser).
    web_user: str = "www-data"
    web_group: str = "www-data"
    #: user name -> its primary group's name; KeyError for an unknown user.
    primary_group: Callable[[str], str] = webuser.primary_group
    #: CPUs and bytes of memory of the machine; 0: unknown (no capacity check).
    cpus: int = 0
    memory: int = 0

    @classmethod
    def probe(cls, dep: Optional[Deployment] = None) -> "Host":
        configured = dep.nginx.binary if dep else ""
        euid = os.geteuid()
        try:
            user = pwd.getpwuid(euid).pw_name
        except KeyError:  # a uid without a passwd entry (containers)
            user = "root" if euid == 0 else str(euid)
        web_user, web_group = webuser.probe_web_user()
        return cls(euid=euid, user=user,
                   nginx_binary=find_nginx(configured) or configured or "nginx",
                   mime_types=SYSTEM_MIME_TYPES if os.path.isfile(SYSTEM_MIME_TYPES) else "",
                   web_user=web_user, web_group=web_group,
                   cpus=len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 0),
                   memory=_memory_bytes())


def _memory_bytes() -> int:
    """Physical memory in bytes; 0 if unknown."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        return 0


def find_nginx(configured: str = "") -> str:
    """The nginx executable (``configured``, else "nginx") on PATH or in the sbin dirs; "" if none."""
    path = os.environ.get("PATH", os.defpath) + os.pathsep + os.pathsep.join(_NGINX_SEARCH)
    return shutil.which(configured or "nginx", path=path) or ""


def builtin_template_dir() -> str:
    """Directory of the built-in templates (installed package or checkout)."""
    try:
        from importlib import resources
        root = resources.files("fcgi_toolkit.templates")
        candidate = str(root)
        if os.path.isfile(os.path.join(candidate, "supervisord.conf.j2")):
            return candidate
    except (ImportError, ModuleNotFoundError, TypeError):
        pass
    checkout = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "templates")
    return checkout


def environment(user_dir: str = "") -> "jinja2.Environment":
    """The jinja2 environment: ``user_dir`` overrides, then the built-in templates."""
    import jinja2

    search = ([user_dir] if user_dir else []) + [builtin_template_dir()]
    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(search),
        undefined=jinja2.StrictUndefined,
        autoescape=False,
        keep_trailing_newline=True,
        trim_blocks=True,
        lstrip_blocks=True,
    )


def nginx_duration(seconds: float) -> str:
    """A duration in nginx syntax, rounded up to whole milliseconds."""
    ms = int(math.ceil(seconds * 1000))
    return "%ds" % (ms // 1000) if ms % 1000 == 0 else "%dms" % ms


def _pcre_literal(text: str) -> str:
    # url_prefix admits only [A-Za-z0-9_.~/-]; of those only '.' is special.
    return re.sub(r"([.])", r"\\\1", text)


def _inet_port(value: str) -> str:
    # supervisor binds a bare port on every interface; keep it on loopback.
    return value if ":" in value else "127.0.0.1:" + value


def stop_waits(dep: Deployment) -> dict[str, int]:
    """supervisord's stopwaitsecs for each program: the workers drain within
    graceful_timeout, nginx finishes a request within read_timeout."""
    workers = int(math.ceil(dep.workers.graceful_timeout)) + 5
    # An inner supervisord stops its watchdog, then its workers (README "Generations").
    return {"workers": workers, "nginx": int(math.ceil(dep.nginx.read_timeout)) + 5,
            "watchdog": 10, "metrics": 10, "supervisord": workers + 10 + 5}


def context(dep: Deployment, host: Host, conf_dir: str) -> dict:
    """The template context: the deployment's plus what the templates derive."""
    ctx = dep.context()
    waits = stop_waits(dep)
    location = dep.nginx.location
    identity = nginx_identity(dep, host)
    ctx.update(
        conf_dir=conf_dir,
        fragment=False,   # True: the conf.d fragment of fcgi_toolkit.install
        rpc_plugin=True,  # the fragment carries [rpcinterface:fcgi_NAME] (install --rpc-plugin)
        socket_mode="%04o" % dep.workers.socket_mode,
        socket_owner=identity.socket_owner if identity and identity.socket_owner else dep.workers.socket_owner,
        host_user=host.user,
        nginx_binary=host.nginx_binary,
        nginx_user="%s %s" % (identity.user, identity.group) if identity else "",
        nginx_worker_processes=1,
        mime_types=host.mime_types,
        stopwaitsecs=waits["workers"],
        nginx_stopwaitsecs=waits["nginx"],
        watchdog_stopwaitsecs=waits["watchdog"],
        metrics_stopwaitsecs=waits["metrics"],
        supervisord_stopwaitsecs=waits["supervisord"],
        inet_port=_inet_port(dep.control.inet_port) if dep.control.inet_port else "",
        # One supervisord.conf holds everything (holder 0); see supervisord_files.
        holds_workers=True, is_front=True, inner_program="", inner_conf="", front_port="",
        supervisord_log=names.supervisord_file("supervisord.log", dep.holder),
        identifier=dep.supervisord_program or dep.name,
        upstream_server=("unix:" + dep.socket_path if dep.socket_is_unix
                         else dep.socket_url[len("tcp://"):]),
        location=location,
        script_name=location.rstrip("/"),
        script_name_regex=_pcre_literal(location.rstrip("/")),
        socket_path=dep.socket_path if dep.socket_is_unix else "",
        socket_host_port=("" if dep.socket_is_unix else dep.socket_url[len("tcp://"):]),
        listen_host_port=_listen_host_port(dep.nginx.listen),
        static_dirs=[(prefix.rstrip("/"), directory.rstrip("/"))
                     for prefix, directory in sorted(dep.nginx.static.items())],
        read_timeout_s=int(math.ceil(dep.nginx.read_timeout)),
        connect_timeout_s=int(math.ceil(dep.nginx.connect_timeout)),
        server_name_var="$host" if dep.nginx.server_name == "_" else "$server_name",
        static_locations=[(prefix, directory.rstrip("/") + "/")
                          for prefix, directory in sorted(dep.nginx.static.items())],
        connect_timeout=nginx_duration(dep.nginx.connect_timeout),
        read_timeout=nginx_duration(dep.nginx.read_timeout),
        upstream_servers=[upstream_server_line(h, h.name in dep.out_of_rotation)
                          for h in dep.hosts],
    )
    return ctx


def nginx_identity(dep: Deployment, host: Host) -> Optional[webuser.NginxIdentity]:
    """Who nginx's workers run as when nginx is started by root (never root);
    None when it is not (nginx then cannot change user)."""
    if host.euid != 0:
        return None
    try:
        return webuser.nginx_identity(
            dep.socket_is_unix, dep.workers.socket_owner, dep.workers.user, host.user,
            host.web_user, host.web_group, host.primary_group)
    except KeyError:
        key, value = (("workers.socket_owner", dep.workers.socket_owner) if dep.workers.socket_owner
                      else ("workers.user", dep.workers.user))
        raise ConfigError("%s: %s = %r: no such user on this machine" % (dep.path, key, value)) from None


def check_socket_access(dep: Deployment, host: Host) -> None:
    """A root-started nginx reaches a unix socket through its owner or group
    bits: refuse a socket_mode that gives it neither."""
    identity = nginx_identity(dep, host)
    if identity is None or not dep.socket_is_unix:
        return
    owner = (dep.workers.socket_owner.partition(":")[0] or dep.workers.user)
    through_owner = identity.user == owner
    needed = 0o600 if through_owner else 0o060
    if dep.workers.socket_mode & needed != needed:
        raise ConfigError(
            "%s: workers.socket_mode = '%04o': nginx's workers run as %s (group %s) and open the "
            "socket through its %s bits, which must allow read and write (like 0660)"
            % (dep.path, dep.workers.socket_mode, identity.user, identity.group,
               "owner" if through_owner else "group"))


def check_capacity(dep: Deployment, host: Host) -> None:
    """Refuse a workers.count this machine cannot hold in memory (see README
    "Safe defaults"): at the peak of a recycle, count + recycle.max_concurrent
    workers (at most every slot) are alive, each allowed to grow to
    limits.max_rss before it is replaced (without max_rss, each costs at
    least MIN_WORKER_RSS)."""
    if not host.memory:
        return
    alive = min(dep.slots, dep.workers.count + dep.recycle.max_concurrent)
    each = dep.limits.max_rss or MIN_WORKER_RSS
    if alive * each > host.memory:
        from fcgi_toolkit.names import format_size
        why = ("limits.max_rss = %s each" % format_size(dep.limits.max_rss) if dep.limits.max_rss
               else "at least %s each (an idle worker's own memory)" % format_size(MIN_WORKER_RSS))
        raise ConfigError(
            "%s: workers.count = %d: at the peak of a recycle %d workers run, %s: %s, more than "
            "this machine's %s of memory" % (dep.path, dep.workers.count, alive, why,
                                             format_size(alive * each), format_size(host.memory)))


def capacity_warning(dep: Deployment, host: Host) -> str:
    """A line for stderr when workers.count is above what the CPUs run at
    once (allowed: an I/O-bound app may want it; see README), else ""."""
    if host.cpus and dep.workers.count > CPU_FACTOR * host.cpus:
        return ("%s: workers.count = %d is more than %d x this machine's %d CPUs; if the app is "
                "I/O-bound, prefer workers.threads" % (dep.path, dep.workers.count, CPU_FACTOR, host.cpus))
    return ""


def _listen_host_port(listen: str) -> tuple:
    """(host, port) of ``nginx.listen`` ("host:port", "[v6]:port" or "port";
    a bare port listens on every address, as in nginx)."""
    host, sep, port = listen.rpartition(":")
    if not sep:
        return "", listen
    return host, port


def upstream_server_line(spec: settings.HostSpec, down: bool = False) -> str:
    """The nginx ``server`` parameters of one host: address, failure
    detection, backup; ``down`` while a rollout has it out of rotation."""
    line = "%s max_fails=%d fail_timeout=%s" % (spec.address, spec.max_fails,
                                                 nginx_duration(spec.fail_timeout))
    return line + (" backup" if spec.backup else "") + (" down" if down else "")


#: The files of each view of a multi-host file (see the module docstring).
WEB_SERVER_FILES = SITE_FILES["nginx"]
HOST_FILES = ("supervisord.conf",)


def render_templates(dep: Deployment, ctx: Mapping, templates: Mapping[str, str]) -> dict[str, str]:
    """{name: template} rendered with ``ctx`` (see :func:`context`); writes nothing."""
    import jinja2

    env = environment(dep.runtime.templates)
    out = {}
    for filename, template in templates.items():
        try:
            out[filename] = env.get_template(template).render(ctx)
        except jinja2.TemplateError as exc:
            raise ConfigError("%s: template %s: %s" % (dep.path, template, exc)) from None
    return out


def _render_files(dep: Deployment, host: Host, conf_dir: str, files) -> dict[str, str]:
    return render_templates(dep, context(dep, host, conf_dir), {name: FILES[name] for name in files})


def web_server_files(dep: Deployment, host: Host, conf_dir: str) -> dict[str, str]:
    """The web server's files of a multi-host front view (nginx.conf and
    nginx-site.conf), rendered in memory."""
    return _render_files(dep, host, conf_dir, WEB_SERVER_FILES)


def supervisord_files(dep: Deployment, host: Host, conf_dir: str) -> dict[str, str]:
    """supervisord.conf, and while an inner supervisord holds the workers
    (``dep.holder``, README "Generations") its own ``supervisord-gN.conf``:
    the front's then keeps nginx and the metrics and runs the inner one as
    ``[program:<name>_sN]``; the inner one holds the worker group, the
    watchdog and the TCP control port."""
    ctx = context(dep, host, conf_dir)
    if not dep.holder:
        return render_templates(dep, ctx, {"supervisord.conf": FILES["supervisord.conf"]})
    inner_name = os.path.basename(dep.supervisord_conf)
    inner = dict(ctx, is_front=False)
    front = dict(ctx, holds_workers=False, inner_program=dep.supervisord_program,
                 inner_conf=os.path.join(conf_dir, inner_name), inet_port="",
                 front_port=dep.generation.front_port, control_socket=dep.front_control_socket,
                 supervisord_pidfile=dep.front_pidfile, supervisord_conf=dep.front_conf,
                 supervisord_log="supervisord.log", identifier=dep.name)
    out = render_templates(dep, front, {"supervisord.conf": FILES["supervisord.conf"]})
    out.update(render_templates(dep, inner, {inner_name: FILES["supervisord.conf"]}))
    return out


def render_all(dep: Deployment, host: Host, conf_dir: str) -> dict[str, str]:
    """Every file, rendered in memory: {path relative to conf_dir: text}.  Writes nothing.

    One machine: supervisord.conf and the site files of ``web.server``
    (:data:`SITE_FILES`).  A host view
    of a ``[[hosts]]`` file: supervisord.conf.  The front view: the nginx
    files and ``<host>/supervisord.conf`` for every host.
    """
    check_socket_access(dep, host)
    if not dep.multi_host or dep.host is not None:
        check_capacity(dep, host)   # this machine runs the workers
    if not dep.multi_host:
        return {**supervisord_files(dep, host, conf_dir),
                **_render_files(dep, host, conf_dir, SITE_FILES[dep.web.server])}
    if dep.host is not None:
        return _render_files(dep, host, conf_dir, HOST_FILES)
    out = web_server_files(dep, host, conf_dir)
    for name in dep.host_names():
        view = dep.for_host(name)
        for filename, text in _render_files(view, host, os.path.join(conf_dir, name), HOST_FILES).items():
            out[name + "/" + filename] = text
    return out


def write_atomic(files: Mapping[str, str], directory: str, mode: int = 0o644,
                 modes: Optional[Mapping[str, int]] = None) -> list[str]:
    """Write every file into ``directory``: temp file + os.replace each.

    ``modes`` overrides ``mode`` for the files it names.

    All temporary files are written before the first one is moved, so a
    failure while writing leaves the directory as it was.
    """
    os.makedirs(directory, mode=0o755, exist_ok=True)
    pending: list[tuple[str, str]] = []
    try:
        for filename, text in files.items():
            # A name may have a subdirectory ("web1/supervisord.conf").
            final = os.path.join(directory, filename)
            target_dir, base = os.path.split(final)
            os.makedirs(target_dir, mode=0o755, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix="." + base + ".", suffix=".tmp", dir=target_dir)
            pending.append((tmp, final))
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(text)
            os.chmod(tmp, (modes or {}).get(filename, mode))
    except BaseException:
        for tmp, _ in pending:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
        raise
    for tmp, final in pending:
        os.replace(tmp, final)
    return [final for _, final in pending]


def render(dep: Deployment, out_dir: Optional[str] = None, host: Optional[Host] = None) -> list[str]:
    """Render every file for ``dep`` into ``out_dir`` (default: its runtime dir)."""
    out_dir = os.path.abspath(out_dir or dep.runtime_dir)
    files = render_all(dep, host or Host.probe(dep), out_dir)
    return write_rendered(dep, files, out_dir)


def write_rendered(dep: Deployment, files: Mapping[str, str], out_dir: str) -> list[str]:
    """Write what :func:`render_all` made; a supervisord.conf that carries the
    TCP control port's password is readable by its owner only."""
    private = 0o600 if dep.control.password else 0o644
    modes = {name: private for name in files
             if re.fullmatch(r"supervisord(-g\d+)?\.conf", os.path.basename(name))}
    return write_atomic(files, out_dir, modes=modes)


# -- command --------------------------------------------------------------

def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-c", "--config", default="deploy.toml", help="deployment file (default: %(default)s)")
    parser.add_argument("-o", "--output", default=None,
                        help="output directory (default: the deployment's runtime dir)")
    parser.add_argument("--host", default=None, metavar="NAME",
                        help="with [[hosts]]: render only this host's supervisord.conf "
                             "(default: the nginx files and every host's DIR/NAME/supervisord.conf)")


def run(args: argparse.Namespace) -> int:
    # Without --host, FCGI_TOOLKIT_HOST (if set) selects the host, as for
    # every other command.
    dep = settings.load(args.config, host=args.host)
    if not dep.multi_host:
        # A running deployment's files name the group that serves (README "Generations").
        from fcgi_toolkit import generations
        dep = generations.serving(dep)
    for path in render(dep, args.output):
        print(path)
    return 0
