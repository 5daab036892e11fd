"""The deployment file: one registry of settings, typed once.

Every key of ``deploy.toml`` is declared exactly once in :data:`REGISTRY`
(section, name, converter, default, help).  That declaration drives
validation (:func:`load`), the template context (:meth:`Deployment.context`)
and the settings table in README.rst (``python -m fcgi_toolkit settings-table``).

Values that end up inside generated configuration files are checked against
allow-lists by the converters (:mod:`fcgi_toolkit.converters`), so that no
user value can add a line, a directive or a section to supervisord.conf or
nginx.conf.
"""
from __future__ import annotations

import difflib
import enum
import os
import sys
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Any, Callable, Mapping, Optional

from fcgi_toolkit import names
from fcgi_toolkit.converters import (
    loopback_address,
    name,
    wsgi_ref,
    safe_path,
    optional_path,
    positive_int,
    non_negative_int,
    seconds,
    size,
    socket_mode,
    user,
    user_group,
    boolean_value,
    environment,
    socket_address,
    listen_address,
    optional_listen_address,
    metrics_address,
    server_names,
    url_prefix,
    static_map,
    path_list,
    command_line,
    plain_text,
    ip_list,
    host_address,
    web_server,
    path_info_source)

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10 only
    import tomli as tomllib


class ConfigError(ValueError):
    """A bad deployment file: the message is one line naming file, key and value."""


# --------------------------------------------------------------------------
# The registry.
# --------------------------------------------------------------------------

REQUIRED = object()


@dataclass(frozen=True)
class Setting:
    """One key of the deployment file."""
    section: str
    name: str
    convert: Callable[[Any], Any]
    default: Any
    help: str
    example: Any = None

    @property
    def key(self) -> str:
        return "%s.%s" % (self.section, self.name)


REGISTRY: tuple[Setting, ...] = (
    # [app]
    Setting("app", "name", name, REQUIRED,
            "Program and group name in supervisord: [a-z][a-z0-9_]*.", "wiki"),
    Setting("app", "wsgi", wsgi_ref, REQUIRED,
            "The WSGI application, as module:callable.", "wikiapp.wsgi:application"),
    Setting("app", "directory", safe_path, ".",
            "Workers chdir here and import from here; relative to the deployment file."),
    Setting("app", "python", optional_path, "",
            "Interpreter that runs the workers; empty means the one running fcgi-toolkit."),
    Setting("app", "environment", environment, {},
            "Extra environment for the workers, read by each worker at start."),
    # [workers]
    Setting("workers", "count", positive_int, 2,
            "Workers serving at all times."),
    Setting("workers", "standby", non_negative_int, 2,
            "Extra workers that take over from a recycled worker before it stops (warm standbys;"
            " stopped slots with warm_standby = false); two, so that two workers breaking a limit"
            " together are both replaced at once."),
    Setting("workers", "warm_standby", boolean_value, True,
            "Standby workers run with the app imported, accepting nothing, and take over at"
            " once (SIGUSR2) when a worker is recycled; false: a standby slot stays stopped"
            " until a replacement starts in it (no memory held, ~1 s slower recycles)."),
    Setting("workers", "max_slots", non_negative_int, 0,
            "Process slots supervisord has (numprocs); workers.count and workers.standby can "
            "then grow up to it with `apply`; at least (and 0:) workers.count + 2 x workers.standby"
            " (a spare slot per standby, for its successor while the offender drains).", 8),
    Setting("workers", "threads", positive_int, 1,
            "Requests one worker serves at once (flup thread pool size)."),
    Setting("workers", "socket", socket_address, "",
            'Shared socket: "unix:///abs/path" or "tcp://host:port"; empty: <runtime.dir>/<name>.sock.'),
    Setting("workers", "socket_mode", socket_mode, "0660",
            "Permission bits of a unix socket; world-writable is refused."),
    Setting("workers", "socket_owner", user_group, "",
            'Owner of a unix socket, "user" or "user:group"; empty: the supervisord user.'),
    Setting("workers", "user", user, "",
            "User the workers run as (supervisord must run as root); empty: unchanged."),
    Setting("workers", "graceful_timeout", seconds, 30.0,
            "Drain deadline: a stopping worker finishes its requests within it, then is killed."),
    Setting("workers", "idle_timeout", seconds, 60.0,
            "A FastCGI connection silent this long between records is closed."),
    Setting("workers", "debug", boolean_value, False,
            "Send tracebacks to clients in error pages (never in production)."),
    # [limits]
    Setting("limits", "max_rss", size, 0,
            "Recycle a worker whose resident memory is above this (0: off).", "256MB"),
    Setting("limits", "max_rss_hard", size, 0,
            "Stop a worker above this at once, replacement ready or not; another ready worker"
            " keeps serving (0: off; needs max_rss, and above it).", "512MB"),
    Setting("limits", "max_requests", non_negative_int, 0,
            "Recycle a worker after this many requests (0: off).", 1000),
    Setting("limits", "max_requests_jitter", non_negative_int, 0,
            "Random extra requests, drawn once per worker life.", 100),
    Setting("limits", "max_age", seconds, 0.0,
            "Recycle a worker older than this (0: off); jittered by up to 10%.", "6h"),
    Setting("limits", "request_timeout", seconds, 0.0,
            "Kill and replace a worker whose request runs longer (0: off).", "60s"),
    Setting("limits", "slow_request", seconds, 0.0,
            "Dump the stacks of a worker whose request runs longer, once per request (0: off).", "10s"),
    # [recycle]
    Setting("recycle", "check_interval", seconds, 1.0,
            "How often the watchdog samples every worker."),
    Setting("recycle", "max_concurrent", positive_int, 2,
            "Most workers of the group being replaced at once (each through its own standby)."),
    Setting("recycle", "ready_timeout", seconds, 60.0,
            "A replacement not ready within this is a failed start."),
    Setting("recycle", "flap_window", seconds, 60.0,
            "max_age (or max_rss without procfs) broken within this of a worker's start is"
            " flapping: back off. For max_rss the RSS at start decides."),
    Setting("recycle", "watch", path_list, [],
            "Files whose change triggers a rolling reload; relative to the deployment file."),
    Setting("recycle", "debounce", seconds, 2.0,
            "Quiet time after the last change of a watched file before reloading."),
    # [nginx]
    Setting("nginx", "listen", listen_address, "127.0.0.1:8080",
            "nginx listen address of the generated server block."),
    Setting("nginx", "server_name", server_names, "_",
            "nginx server_name."),
    Setting("nginx", "location", url_prefix, "/",
            'URL prefix the app is mounted at ("/wiki/"); sets SCRIPT_NAME and PATH_INFO.'),
    Setting("nginx", "static", static_map, {},
            'Static locations served by nginx: { "/static/" = "static/" }, relative to the deployment file.'),
    Setting("nginx", "managed", boolean_value, True,
            "`fcgi-toolkit run` also runs nginx under supervisord."),
    Setting("nginx", "keepalive", non_negative_int, 0,
            "Idle FastCGI connections nginx keeps per worker process (0: a connection per request)."),
    Setting("nginx", "connect_timeout", seconds, 5.0,
            "fastcgi_connect_timeout."),
    Setting("nginx", "read_timeout", seconds, 60.0,
            "fastcgi_read_timeout / fastcgi_send_timeout."),
    Setting("nginx", "client_max_body_size", size, 16 * 1024 * 1024,
            "Largest request body nginx accepts."),
    Setting("nginx", "web_servers", ip_list, [],
            "IP addresses nginx connects to the workers from: workers on a TCP socket accept no one else "
            "(FCGI_WEB_SERVER_ADDRS); required with [[hosts]]; empty: any peer.", ["10.0.0.5"]),
    Setting("nginx", "binary", optional_path, "",
            "nginx executable for a managed nginx; empty: found on PATH."),
    Setting("nginx", "reload", command_line, [],
            "Command `apply` runs to reload a system nginx (nginx.managed = false) gracefully after a "
            "generation switch re-rendered its site file; empty: <nginx> -s reload.",
            ["sudo", "systemctl", "reload", "nginx"]),
    # [web]
    Setting("web", "server", web_server, "nginx",
            'Web server the site file is rendered for: "nginx" (nginx-site.conf, and nginx.conf for a managed '
            'nginx), "apache" (apache-site.conf, mod_proxy_fcgi), "lighttpd" (lighttpd-site.conf, mod_fastcgi) '
            'or "caddy" (Caddyfile). The [nginx] settings listen, server_name, location, static, timeouts and '
            'client_max_body_size apply to each; nginx.managed and nginx.keepalive to nginx only.'),
    Setting("web", "path_info", path_info_source, "request_uri",
            '"request_uri": the worker sets SCRIPT_NAME and PATH_INFO from REQUEST_URI and nginx.location '
            '(decoded once, slashes kept), whatever the web server sent; "web_server": it keeps a non-empty '
            'PATH_INFO the web server sent (for hand-written configs that rewrite URLs).'),
    # [runtime]
    Setting("runtime", "dir", optional_path, "",
            "Rendered configs, socket, pid files, scoreboard; empty: .fcgi-toolkit/<name>, relative to the deployment file."),
    Setting("runtime", "log_dir", optional_path, "",
            "Log directory; empty: <runtime.dir>/log."),
    Setting("runtime", "templates", optional_path, "",
            "Directory of templates overriding the built-in ones (same file names)."),
    # [metrics]
    Setting("metrics", "listen", metrics_address, "",
            "Prometheus metrics address (loopback); empty: off."),
    # [control]
    Setting("control", "inet_port", optional_listen_address, "",
            "supervisord TCP control port (needs username and password); with [[hosts]] a port only, bound on each host's own address; empty: unix socket only."),
    Setting("control", "username", plain_text, "",
            "User name for the TCP control port."),
    Setting("control", "password", plain_text, "",
            "Password for the TCP control port."),
    Setting("control", "system_supervisord", optional_path, "",
            "The distribution's supervisord.conf this deployment is added to by `fcgi-toolkit install`; "
            "operator commands reach that supervisord through its [supervisorctl] serverurl; "
            "empty: the toolkit's own supervisord (`run`).", "/etc/supervisor/supervisord.conf"),
)


class Applied(enum.Enum):
    """How a changed key takes effect in a running deployment (``fcgi-toolkit apply``)."""
    WATCHDOG = "watchdog re-reads"          # the coordinator swaps its Limits
    ROLLING = "rolling worker replacement"  # read by each worker at start
    COUNT = "count change"                  # within workers.max_slots: the watchdog
                                            # starts or stops slots; beyond: new supervisord
    NGINX = "nginx graceful reload"         # nginx files re-rendered, HUP to nginx
    GENERATION = "new generation"           # rendered into [fcgi-program]: a new group in the
                                            # same supervisord, nginx switched to it
    SUPERVISORD = "new supervisord"         # supervisord's own sections ([control]): a new
                                            # generation in a new inner supervisord
    RESTART = "stop and run again"          # what `run` itself set up: no generation takes it


#: The one table of how each key is applied (README's settings table shows
#: it).  workers.count and workers.standby change live while their sum stays
#: within the running group's slots (workers.max_slots); beyond, with a new
#: generation.
APPLIED_BY: Mapping[str, Applied] = MappingProxyType({
    **{key: Applied.WATCHDOG for key in (
        "limits.max_rss", "limits.max_rss_hard", "limits.max_requests", "limits.max_requests_jitter", "limits.max_age",
        "limits.request_timeout", "limits.slow_request", "recycle.check_interval",
        "recycle.max_concurrent", "recycle.ready_timeout", "recycle.flap_window",
        "recycle.watch", "recycle.debounce")},
    **{key: Applied.ROLLING for key in (
        "app.wsgi", "app.environment", "workers.threads", "workers.idle_timeout",
        "workers.debug", "workers.warm_standby", "web.path_info")},
    **{key: Applied.COUNT for key in ("workers.count", "workers.standby")},
    **{key: Applied.NGINX for key in (
        "nginx.listen", "nginx.server_name", "nginx.location", "nginx.static",
        "nginx.keepalive", "nginx.connect_timeout", "nginx.read_timeout",
        "nginx.client_max_body_size", "nginx.reload")},
    **{key: Applied.GENERATION for key in (
        "app.directory", "app.python", "workers.max_slots", "workers.socket",
        "workers.socket_mode", "workers.socket_owner", "workers.user",
        "workers.graceful_timeout", "nginx.web_servers")},
    **{key: Applied.SUPERVISORD for key in (
        "control.inet_port", "control.username", "control.password")},
    **{key: Applied.RESTART for key in (
        "app.name", "nginx.managed", "nginx.binary", "runtime.dir", "runtime.log_dir", "runtime.templates", "metrics.listen",
        "control.system_supervisord", "web.server", "hosts")},
})


def applied_by(key: str) -> Applied:
    """How ``key`` ("section.name", or "hosts" for any ``[[hosts]]`` key) takes effect."""
    return APPLIED_BY["hosts" if key.startswith("hosts") else key]


#: Keys of one ``[[hosts]]`` table (several machines running the same worker
#: group behind one nginx).  A default of None is derived: ``count`` from
#: workers.count.
HOST_REGISTRY: tuple[Setting, ...] = (
    Setting("hosts", "name", name, REQUIRED,
            "The host's name, [a-z][a-z0-9_]*: `render --host NAME`, FCGI_TOOLKIT_HOST.", "web1"),
    Setting("hosts", "address", host_address, REQUIRED,
            'The host\'s worker socket, "IPv4:port" of its own interface (never 0.0.0.0).',
            "10.0.0.11:9000"),
    Setting("hosts", "count", positive_int, None,
            "Workers serving on this host; default workers.count."),
    Setting("hosts", "backup", boolean_value, False,
            "nginx sends requests here only while every other host is failed."),
    Setting("hosts", "max_fails", non_negative_int, 1,
            "Failed attempts (refused, reset, timed out) within fail_timeout that take the host out of rotation."),
    Setting("hosts", "fail_timeout", seconds, 10.0,
            "How long a failed host stays out of rotation before nginx tries it again."),
)

#: The environment variable naming the host a process belongs to.  Each
#: host's supervisord.conf sets it for every child (worker, watchdog,
#: metrics), so that ``load`` returns that host's view of the file.
HOST_ENV = "FCGI_TOOLKIT_HOST"

SECTIONS: tuple[str, ...] = tuple(dict.fromkeys(s.section for s in REGISTRY))
_BY_KEY = {(s.section, s.name): s for s in REGISTRY}
_HOST_KEYS = {s.name: s for s in HOST_REGISTRY}


@dataclass(frozen=True)
class HostSpec:
    """One ``[[hosts]]`` entry, validated."""
    name: str
    address: str          # "IPv4:port", the host's worker socket
    count: int
    backup: bool
    max_fails: int
    fail_timeout: float   # seconds

    @property
    def ip(self) -> str:
        return self.address.rpartition(":")[0]

    @property
    def port(self) -> int:
        return int(self.address.rpartition(":")[2])


class Section(Mapping):
    """Read-only view of one section's typed values with attribute access."""

    def __init__(self, values: dict):
        self._values = MappingProxyType(dict(values))

    def __getattr__(self, item: str) -> Any:
        try:
            return self._values[item]
        except KeyError:
            raise AttributeError(item) from None

    def __getitem__(self, item: str) -> Any:
        return self._values[item]

    def __iter__(self):
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)


@dataclass(frozen=True)
class Deployment:
    """A validated deployment file with every path made absolute.

    With ``[[hosts]]`` there are two views of one file.  The *front* view
    (``host`` is None) is what the web server needs: every host, the nginx
    settings, runtime.dir for nginx's own files.  A *host* view
    (:meth:`for_host`, or ``load`` with FCGI_TOOLKIT_HOST set) is one machine
    as if it were a single-host file: workers.count is the host's count,
    workers.socket its ``tcp://address``, runtime.dir and runtime.log_dir
    get a ``/<host>`` subdirectory (so hosts never share a scoreboard or a
    control socket, even on one machine), and a control.inet_port (a bare
    port in a multi-host file) becomes ``<host IP>:<port>``.
    """
    path: str
    sections: Mapping[str, Section] = field(repr=False)
    hosts: tuple = ()                       # tuple[HostSpec, ...]
    host: Optional[HostSpec] = None         # the selected host (host view)
    #: The worker group's generation (fcgi_toolkit.generations.Generation);
    #: None: generation 1 as the file gives it.  Group, socket, scoreboard
    #: and slots follow it.
    generation: Any = None
    #: Hosts nginx's upstream marks ``down`` (a multi-host rollout takes one
    #: host out of rotation at a time: fcgi_toolkit.rollout).
    out_of_rotation: frozenset = frozenset()
    #: Where the bytes came from when not ``path``: what ``run`` started
    #: reads ``<runtime.dir>/applied.toml``, the file as last applied
    #: (fcgi_toolkit.respawn); its supervised commands read the same bytes.
    source: str = ""

    def __getattr__(self, item: str) -> Section:
        try:
            return self.sections[item]
        except KeyError:
            raise AttributeError(item) from None

    # Derived values -------------------------------------------------------
    @property
    def base_dir(self) -> str:
        return os.path.dirname(self.path)

    @property
    def name(self) -> str:
        return self.app.name

    @property
    def group(self) -> str:
        """The worker group's supervisord name (the generation's; app.name for generation 1)."""
        return self.generation.group if self.generation is not None else self.app.name

    @property
    def generation_number(self) -> int:
        return self.generation.number if self.generation is not None else 1

    @property
    def slots(self) -> int:
        """Number of process slots (supervisord's numprocs, the generation's):
        :func:`slot_total`."""
        if self.generation is not None:
            return self.generation.slots
        return slot_total(self.workers.count, self.workers.standby, self.workers.max_slots)

    @property
    def used_slots(self) -> int:
        """Slots the watchdog starts workers in: serving plus standby (the
        rest, up to :attr:`slots`, are spare for a later ``apply``)."""
        return self.workers.count + self.workers.standby

    def fits(self, slots: int) -> bool:
        """Whether this file's workers and standby fit a supervisord of ``slots`` slots."""
        return self.used_slots <= slots

    def slot_names(self) -> list[str]:
        return names.slot_names(self.group, self.slots)

    @property
    def runtime_dir(self) -> str:
        return self.runtime.dir

    @property
    def log_dir(self) -> str:
        return self.runtime.log_dir

    @property
    def scoreboard_path(self) -> str:
        if self.generation is not None:
            return self.generation.scoreboard_path
        return os.path.join(self.runtime_dir, "scoreboard")

    @property
    def state_path(self) -> str:
        return os.path.join(self.runtime_dir, "watchdog-state.json")

    @property
    def holder(self) -> int:
        """Which supervisord holds the workers: 0 the front (the one ``run``
        started), N the inner supervisord generation N started in it."""
        return self.generation.supervisord if self.generation is not None else 0

    def _supervisord_file(self, filename: str, number: int) -> str:
        return os.path.join(self.runtime_dir, names.supervisord_file(filename, number))

    @property
    def control_socket(self) -> str:
        """The private control socket of the supervisord holding the workers."""
        return self._supervisord_file("supervisor.sock", self.holder)

    @property
    def supervisord_conf(self) -> str:
        return self._supervisord_file("supervisord.conf", self.holder)

    @property
    def supervisord_pidfile(self) -> str:
        return self._supervisord_file("supervisord.pid", self.holder)

    @property
    def supervisord_program(self) -> str:
        """The front's program of the inner supervisord holding the workers ("" for the front)."""
        return names.supervisord_program(self.name, self.holder) if self.holder else ""

    @property
    def front_control_socket(self) -> str:
        """The front's control socket: the managed nginx and the inner supervisords live there."""
        return self._supervisord_file("supervisor.sock", 0)

    @property
    def front_conf(self) -> str:
        return self._supervisord_file("supervisord.conf", 0)

    @property
    def front_pidfile(self) -> str:
        return self._supervisord_file("supervisord.pid", 0)

    @property
    def socket_url(self) -> str:
        """The worker group's socket: workers.socket, or the generation's own."""
        if self.generation is not None:
            return self.generation.socket_url
        return self.workers.socket

    @property
    def socket_is_unix(self) -> bool:
        return self.socket_url.startswith("unix://")

    @property
    def socket_path(self) -> str:
        """Filesystem path of a unix socket ("" for TCP)."""
        return self.socket_url[len("unix://"):] if self.socket_is_unix else ""

    @property
    def python(self) -> str:
        return self.app.python

    @property
    def multi_host(self) -> bool:
        return bool(self.hosts)

    def host_names(self) -> list[str]:
        return [h.name for h in self.hosts]

    def for_host(self, host_name: str) -> "Deployment":
        """The view of one ``[[hosts]]`` entry (see the class docstring)."""
        if self.host is not None:
            if host_name == self.host.name:
                return self
            raise ValueError("%s is already the view of host %s" % (self.path, self.host.name))
        return _host_view(self, host_name, "host")

    def context(self) -> dict:
        """The template context: every setting by section, plus derived values."""
        ctx: dict[str, Any] = {section: self.sections[section] for section in SECTIONS}
        ctx.update(
            deploy_path=self.path,
            # The supervised commands read the bytes this deployment came from.
            start_from=" --start-from %s" % self.source if self.source else "",
            base_dir=self.base_dir,
            slots=self.slots,
            slot_names=self.slot_names(),
            slot_process_name=names.SUPERVISOR_SLOT_NAME,
            group=self.group,
            generation=self.generation_number,
            nginx_program=names.nginx_program(self.name),
            runtime_dir=self.runtime_dir,
            log_dir=self.log_dir,
            scoreboard_path=self.scoreboard_path,
            control_socket=self.control_socket,
            supervisord_conf=self.supervisord_conf,
            supervisord_pidfile=self.supervisord_pidfile,
            front_pidfile=self.front_pidfile,
            holder=self.holder,
            socket_url=self.socket_url,
            socket_is_unix=self.socket_is_unix,
            socket_path=self.socket_path,
            python=self.python,
            hosts=self.hosts,
            host=self.host,
            multi_host=self.multi_host,
            web_server_addrs=",".join(self.nginx.web_servers),
        )
        return ctx


def slot_total(count: int, standby: int, max_slots: int) -> int:
    """supervisord's numprocs for these settings (one home for the formula):
    ``max_slots``, at least the serving workers and the standbys plus a spare
    slot per standby, so that a promoted standby's successor starts at once,
    while the worker it took over from still drains in its own slot."""
    return max(max_slots, count + 2 * standby)


def _error(path: str, key: str, value: Any, reason: str) -> ConfigError:
    return ConfigError("%s: %s = %r: %s" % (path, key, value, reason))


def _resolve(base: str, value: str) -> str:
    return value if os.path.isabs(value) else os.path.normpath(os.path.join(base, value))


def _parse_hosts(raw: Any, path: str, workers_count: int) -> tuple:
    """The ``[[hosts]]`` array: a tuple of HostSpec (empty without hosts)."""
    if raw is None:
        return ()
    if not isinstance(raw, list) or not raw or not all(isinstance(t, dict) for t in raw):
        raise _error(path, "hosts", raw, "expected one [[hosts]] table per host (an array of tables)")
    out = []
    for i, table in enumerate(raw):
        prefix = "hosts[%d]" % i
        typed: dict[str, Any] = {}
        for key, value in table.items():
            setting = _HOST_KEYS.get(key)
            if setting is None:
                close = difflib.get_close_matches(key, list(_HOST_KEYS), n=1)
                hint = "; did you mean %s.%s?" % (prefix, close[0]) if close else \
                    "; known keys: %s" % ", ".join(_HOST_KEYS)
                raise _error(path, "%s.%s" % (prefix, key), value, "unknown key" + hint)
            try:
                typed[key] = setting.convert(value)
            except ValueError as exc:
                raise _error(path, "%s.%s" % (prefix, key), value, str(exc)) from None
        for setting in HOST_REGISTRY:
            if setting.name in typed:
                continue
            if setting.default is REQUIRED:
                raise _error(path, "%s.%s" % (prefix, setting.name), "", "required key is missing")
            typed[setting.name] = workers_count if setting.default is None else setting.convert(setting.default)
        for earlier in out:
            for key in ("name", "address"):
                if getattr(earlier, key) == typed[key]:
                    raise _error(path, "%s.%s" % (prefix, key), typed[key],
                                 "host %s has the same %s" % (earlier.name, key))
        out.append(HostSpec(**typed))
    if all(h.backup for h in out):
        raise _error(path, "hosts[0].backup", True, "every host is a backup; at least one must serve")
    return tuple(out)


def _check_host_control(path: str, inet_port: str, hosts: tuple) -> None:
    """With ``[[hosts]]``, control.inet_port is a port only: each host's
    supervisord listens on that port of the host's own address (never a
    wildcard), where ``status`` on the web server reaches it."""
    if not inet_port:
        return
    if not inet_port.isdigit():
        raise _error(path, "control.inet_port", inet_port,
                     "with [[hosts]] give a port only, like \"9001\": each host's supervisord "
                     "listens on that port of the host's own address")
    for i, spec in enumerate(hosts):
        if spec.port == int(inet_port):
            raise _error(path, "hosts[%d].address" % i, spec.address,
                         "its port is control.inet_port too; use another port for one of them")
        for earlier in hosts[:i]:
            if earlier.ip == spec.ip:
                raise _error(path, "hosts[%d].address" % i, spec.address,
                             "host %s has the same IP, so their control ports (control.inet_port) "
                             "would collide" % earlier.name)


def _host_view(front: Deployment, host_name: str, key: str) -> Deployment:
    """``front`` seen from one host; ``key`` names where the host name came from."""
    if not front.hosts:
        raise _error(front.path, key, host_name, "the file has no [[hosts]]")
    spec = next((h for h in front.hosts if h.name == host_name), None)
    if spec is None:
        raise _error(front.path, key, host_name, "no such host; [[hosts]] names: %s"
                     % ", ".join(front.host_names()))
    sections = {section: dict(front.sections[section]) for section in SECTIONS}
    sections["workers"].update(count=spec.count, socket="tcp://" + spec.address)
    sections["runtime"].update(dir=os.path.join(front.runtime_dir, spec.name),
                               log_dir=os.path.join(front.log_dir, spec.name))
    if front.control.inet_port:
        # The host's supervisord binds the control port on the host's own address.
        sections["control"].update(inet_port="%s:%s" % (spec.ip, front.control.inet_port))
    return Deployment(path=front.path, hosts=front.hosts, host=spec, sections=MappingProxyType(
        {section: Section(vals) for section, vals in sections.items()}))


def parse(data: Mapping[str, Any], path: str, host: Optional[str] = None) -> Deployment:
    """Validate already-parsed TOML ``data`` read from ``path``: every setting,
    then the rules within a section, then the rules across settings
    (:func:`check_consistency`), for the front view and every host's view.

    ``host`` selects one ``[[hosts]]`` entry: the result is that host's view
    (see :class:`Deployment`); None or "" gives the front view.
    """
    path = os.path.abspath(path)
    values = _convert(data, path)
    _derive(values, os.path.dirname(path), path)
    _check_sections(values, path)
    hosts = _parse_hosts(data.get("hosts"), path, values["workers"]["count"])
    if hosts:
        _check_hosts(data, values, hosts, path)
    dep = Deployment(path=path, hosts=hosts, sections=MappingProxyType(
        {section: Section(vals) for section, vals in values.items()}))
    check_consistency(dep)
    for host_name in dep.host_names():
        check_consistency(dep.for_host(host_name))
    if host:
        return _host_view(dep, host, "host")
    return dep


def _convert(data: Mapping[str, Any], path: str) -> dict[str, dict[str, Any]]:
    """Every setting of every section converted (defaults included); unknown names refused."""
    values: dict[str, dict[str, Any]] = {section: {} for section in SECTIONS}
    for section, table in data.items():
        if section == "hosts":
            continue  # an array of tables, checked by _parse_hosts below
        if section not in values:
            close = difflib.get_close_matches(section, SECTIONS, n=1)
            hint = "; did you mean [%s]?" % close[0] if close else "; known sections: %s" % ", ".join(SECTIONS)
            raise _error(path, section, table if not isinstance(table, dict) else "[%s]" % section,
                         "unknown section" + hint)
        if not isinstance(table, dict):
            raise _error(path, section, table, "expected a [%s] table" % section)
        for key, raw in table.items():
            setting = _BY_KEY.get((section, key))
            if setting is None:
                names = [s.name for s in REGISTRY if s.section == section]
                close = difflib.get_close_matches(key, names, n=1)
                hint = "; did you mean %s.%s?" % (section, close[0]) if close else ""
                raise _error(path, "%s.%s" % (section, key), raw, "unknown key" + hint)
            try:
                values[section][key] = setting.convert(raw)
            except ValueError as exc:
                raise _error(path, setting.key, raw, str(exc)) from None
    for setting in REGISTRY:
        if setting.name not in values[setting.section]:
            if setting.default is REQUIRED:
                raise _error(path, setting.key, "", "required key is missing")
            # Defaults go through the converter too, so a value has one type
            # whether it was written or defaulted.
            values[setting.section][setting.name] = setting.convert(setting.default)
    return values


def _derive(values: dict[str, dict[str, Any]], base: str, path: str) -> None:
    """Derived defaults, and paths made absolute (relative to the file's directory)."""
    app, workers, runtime, nginx, recycle = (values[s] for s in ("app", "workers", "runtime", "nginx", "recycle"))
    app["directory"] = _resolve(base, app["directory"])
    app["python"] = app["python"] or sys.executable
    runtime["dir"] = _resolve(base, runtime["dir"] or os.path.join(".fcgi-toolkit", app["name"]))
    runtime["log_dir"] = _resolve(base, runtime["log_dir"] or os.path.join(runtime["dir"], "log"))
    if runtime["templates"]:
        runtime["templates"] = _resolve(base, runtime["templates"])
    if values["control"]["system_supervisord"]:
        values["control"]["system_supervisord"] = _resolve(base, values["control"]["system_supervisord"])
    nginx["static"] = {prefix: _resolve(base, d) for prefix, d in nginx["static"].items()}
    recycle["watch"] = [_resolve(base, p) for p in recycle["watch"]]
    if not workers["socket"]:
        sock = os.path.join(runtime["dir"], app["name"] + ".sock")
        try:
            workers["socket"] = socket_address("unix://" + sock)
        except ValueError as exc:
            raise _error(path, "runtime.dir", runtime["dir"], "default socket %s: %s" % (sock, exc)) from None
    for key, val in (("runtime.dir", runtime["dir"]), ("runtime.log_dir", runtime["log_dir"]),
                     ("app.directory", app["directory"])):
        try:
            safe_path(val)
        except ValueError as exc:
            raise _error(path, key, val, "resolves to an unusable path: %s" % exc) from None


def _check_sections(values: dict[str, dict[str, Any]], path: str) -> None:
    """Rules between settings of one section."""
    control = values["control"]
    if control["inet_port"] and not (control["username"] and control["password"]):
        raise _error(path, "control.inet_port", control["inet_port"],
                     "a TCP control port needs control.username and control.password")
    limits = values["limits"]
    if limits["max_requests_jitter"] and not limits["max_requests"]:
        raise _error(path, "limits.max_requests_jitter", limits["max_requests_jitter"],
                     "needs limits.max_requests")


def _check_hosts(data: Mapping[str, Any], values: dict[str, dict[str, Any]], hosts: tuple,
                 path: str) -> None:
    """Rules of a ``[[hosts]]`` file."""
    raw_socket = data.get("workers", {}).get("socket", "")
    if raw_socket:
        raise _error(path, "workers.socket", raw_socket,
                     "with [[hosts]] each host's address is its worker socket; remove workers.socket")
    if not values["nginx"]["web_servers"]:
        raise _error(path, "nginx.web_servers", [],
                     "required with [[hosts]]: the IP addresses nginx connects to the workers from")
    _check_host_control(path, values["control"]["inet_port"], hosts)
    # The front view has no worker socket of its own.
    values["workers"]["socket"] = ""


def check_tcp_exposure(dep: Deployment) -> None:
    """A TCP worker socket other machines can reach needs nginx.web_servers:
    whoever reaches it speaks FastCGI to the app and sets any CGI variable
    (REMOTE_USER, HTTPS, REMOTE_ADDR) the app trusts."""
    if dep.socket_is_unix or not dep.socket_url or dep.nginx.web_servers:
        return
    try:
        loopback_address(dep.socket_url[len("tcp://"):])
        return
    except ValueError:
        raise ConfigError(
            "%s: workers.socket = %r: a TCP socket on a non-loopback address needs "
            "nginx.web_servers (the addresses nginx connects from; the workers accept no one "
            "else), or bind it to 127.0.0.1" % (dep.path, dep.socket_url)) from None



def check_consistency(dep: Deployment) -> None:
    """Rules across settings (of one view: the front or a host); raise ConfigError.

    :func:`parse` runs them for every view, so every command, the worker and
    the listener refuse the same files that ``render`` does."""
    if not dep.socket_is_unix and dep.workers.socket_owner:
        raise ConfigError("%s: workers.socket_owner = %r: only a unix socket has an owner"
                          % (dep.path, dep.workers.socket_owner))
    if dep.control.inet_port.startswith("["):
        raise ConfigError("%s: control.inet_port = %r: supervisord's TCP control port is IPv4 only"
                          % (dep.path, dep.control.inet_port))
    check_tcp_exposure(dep)
    server = dep.web.server
    if server != "nginx" and dep.nginx.managed:
        raise ConfigError("%s: web.server = %r: nginx.managed = true runs nginx; set nginx.managed "
                          "= false and run %s with the site file fcgi-toolkit render writes"
                          % (dep.path, server, server))
    if server != "nginx" and dep.multi_host:
        raise ConfigError("%s: web.server = %r: [[hosts]] needs nginx (one upstream with failover); "
                          "set web.server = \"nginx\"" % (dep.path, server))
    if dep.nginx.web_servers and dep.socket_is_unix:
        raise ConfigError("%s: nginx.web_servers = %r: the allow-list applies to TCP sockets only; "
                          "a unix socket is guarded by workers.socket_mode"
                          % (dep.path, dep.nginx.web_servers))
    # nginx's keepalive cache is per nginx worker process and shared by
    # every server of the upstream: its idle connections may all end up on
    # the smallest host, so that host bounds it.
    hard, soft = dep.limits.max_rss_hard, dep.limits.max_rss
    if hard and hard <= soft or hard and not soft:
        raise ConfigError("%s: limits.max_rss_hard = %s: it must be above limits.max_rss (%s)"
                          % (dep.path, names.format_size(hard),
                             names.format_size(soft) if soft else "off"))
    counts = [h.count for h in dep.hosts] or [dep.workers.count]
    threads = min(counts) * dep.workers.threads
    if dep.nginx.keepalive and dep.nginx.keepalive >= threads:
        # A kept-alive idle connection pins one worker thread: with as many
        # idle connections as threads, nginx worker processes that hold none
        # of them wait in the socket backlog until workers.idle_timeout.
        raise ConfigError("%s: nginx.keepalive = %d: each idle kept-alive connection pins a worker "
                          "thread; keep it below %sworkers.count * workers.threads = %d (or 0)"
                          % (dep.path, dep.nginx.keepalive,
                             "the smallest host's " if dep.hosts else "", threads))


def load(path: str, host: Optional[str] = None, source: str = "") -> Deployment:
    """Read and validate a deployment file; raise ConfigError with a one-line message.

    ``host`` (None: the FCGI_TOOLKIT_HOST environment variable, which each
    host's supervisord sets for its children; "": none, the front view)
    selects a ``[[hosts]]`` entry.  ``source``: read that file's bytes as if
    they were ``path``'s (relative paths resolve against ``path``'s directory).
    """
    return loads(read_bytes(source or path), path, host, source)


def add_start_from(parser: Any) -> None:
    """The hidden ``--start-from FILE`` of ``run`` and the supervised commands:
    read FILE's bytes as if they were ``-c``'s (a host's rollback)."""
    import argparse
    parser.add_argument("--start-from", default="", help=argparse.SUPPRESS)


def read_bytes(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        raise ConfigError("%s: no such file" % path) from None
    except OSError as exc:
        raise ConfigError("%s: cannot read: %s" % (path, exc.strerror)) from None


def loads(data: bytes, path: str, host: Optional[str] = None, source: str = "") -> Deployment:
    """:func:`load` of bytes already read (from ``source``, else ``path``)."""
    if host is None:
        host = os.environ.get(HOST_ENV) or None
    try:
        parsed = tomllib.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError("%s: not valid TOML: %s" % (source or path, exc)) from None
    dep = parse(parsed, path, host)
    return replace(dep, source=source) if source else dep


def _rst_escape(text: str) -> str:
    """Help text as plain reStructuredText: no markup characters take effect."""
    for ch in "\\*_`|[]":
        text = text.replace(ch, "\\" + ch)
    return text


def settings_table() -> str:
    """The README's settings table (reStructuredText list-table), from the registry."""
    lines = [".. list-table::", "   :header-rows: 1", "   :widths: 22 16 44 18", "",
             "   * - Key", "     - Default", "     - Meaning", "     - Applied by (``apply``)"]
    for s in REGISTRY + HOST_REGISTRY:
        key = "hosts[].%s" % s.name if s.section == "hosts" else s.key
        default = ("(required)" if s.default is REQUIRED else
                   "(derived)" if s.default is None else repr(s.default))
        lines += ["   * - ``%s``" % key, "     - ``%s``" % default, "     - %s" % _rst_escape(s.help),
                  "     - %s" % applied_by(s.key).value]
    return "\n".join(lines) + "\n"
