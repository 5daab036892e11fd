"""Converters for the deployment file's values.

Each takes the raw TOML value and returns the typed value or raises
ValueError with a short reason; :func:`fcgi_toolkit.settings.load` adds the
file, the key and the value.  Values copied into a generated file are
checked against allow-lists here, so that none can add a line, a directive
or a section to supervisord.conf or nginx.conf.  Sizes, durations, octal
modes and booleans reuse supervisor's own converters.
"""
from __future__ import annotations

import ipaddress
import re
from typing import Any, Callable

from supervisor.datatypes import SuffixMultiplier, boolean, byte_size, octal_type

# --------------------------------------------------------------------------

_seconds = SuffixMultiplier({"s": 1, "m": 60, "h": 3600, "d": 86400})

# Characters allowed in any value copied into a generated file.  No quotes,
# no whitespace, no ';', '{', '}', '$', '%', '#', '\\': nothing that can end a
# directive, open a block or expand a variable in nginx or supervisor.
_SAFE_PATH = re.compile(r"^[A-Za-z0-9_./@+~=,:-]+$")
_NAME = re.compile(r"^[a-z][a-z0-9_]*$")
_DOTTED = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")
_ENV_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_USER = re.compile(r"^[a-z_][a-z0-9_.-]*[$]?$|^[0-9]+$")
_SERVER_NAME = re.compile(r"^[A-Za-z0-9_.*~^:-]+$")
_URL_PREFIX = re.compile(r"^/([A-Za-z0-9_.~-]+/)*$")
_HOST_PORT = re.compile(r"^(?:(?P<host>[A-Za-z0-9.-]+|\[[0-9A-Fa-f:.]+\]):)?(?P<port>[0-9]{1,5})$")


def _expect(kind: type | tuple, value: Any, what: str) -> None:
    # bool is an int in Python; TOML true must not pass as a count.
    if isinstance(value, bool) and bool not in (kind if isinstance(kind, tuple) else (kind,)):
        raise ValueError("expected %s" % what)
    if not isinstance(value, kind):
        raise ValueError("expected %s" % what)


def name(value: Any) -> str:
    _expect(str, value, "a string")
    if not _NAME.match(value) or len(value) > 40:
        raise ValueError("expected a name of [a-z][a-z0-9_]*, at most 40 characters")
    return value


def wsgi_ref(value: Any) -> str:
    _expect(str, value, "a string")
    module, sep, attr = value.partition(":")
    if not sep:
        raise ValueError("expected module:callable (no ':' found)")
    if not _DOTTED.match(module) or not _DOTTED.match(attr):
        raise ValueError("expected module:callable with dotted Python names")
    return value


def safe_path(value: Any) -> str:
    _expect(str, value, "a path string")
    if not _SAFE_PATH.match(value):
        raise ValueError("a path may contain only letters, digits and _./@+~=,:-")
    return value


def optional_path(value: Any) -> str:
    return "" if value == "" else safe_path(value)


def positive_int(value: Any) -> int:
    _expect(int, value, "an integer")
    if value < 1:
        raise ValueError("expected an integer >= 1")
    return value


def non_negative_int(value: Any) -> int:
    _expect(int, value, "an integer")
    if value < 0:
        raise ValueError("expected an integer >= 0")
    return value


def seconds(value: Any) -> float:
    """A duration: a number of seconds, or a string like "30s", "5m", "6h", "1d"."""
    if isinstance(value, bool):
        raise ValueError("expected a duration like 30s, 5m, 6h or a number of seconds")
    if isinstance(value, (int, float)):
        result = float(value)
    elif isinstance(value, str):
        try:
            result = float(_seconds(value.strip()))
        except ValueError:
            raise ValueError("expected a duration like 30s, 5m, 6h or a number of seconds") from None
    else:
        raise ValueError("expected a duration like 30s, 5m, 6h or a number of seconds")
    if result < 0:
        raise ValueError("expected a duration >= 0")
    return result


def size(value: Any) -> int:
    """A byte size: an integer, or a string like "256MB" (KB, MB, GB; 1024-based)."""
    if isinstance(value, bool):
        raise ValueError("expected a size like 256MB")
    if isinstance(value, int):
        result = value
    elif isinstance(value, str):
        try:
            result = int(byte_size(value.strip()))
        except ValueError:
            raise ValueError("expected a size like 512KB, 256MB or 2GB") from None
    else:
        raise ValueError("expected a size like 256MB")
    if result < 0:
        raise ValueError("expected a size >= 0")
    return result


def socket_mode(value: Any) -> int:
    _expect(str, value, 'an octal string like "0660"')
    try:
        mode = octal_type(value)
    except ValueError:
        raise ValueError('expected an octal string like "0660"') from None
    if mode & ~0o777:
        raise ValueError("expected permission bits only (0000-0777)")
    if mode & 0o002:
        raise ValueError("a world-writable socket lets any local user talk to the app")
    return mode


def user(value: Any) -> str:
    _expect(str, value, "a user name")
    if value and not _USER.match(value):
        raise ValueError("expected a user name or uid")
    return value


def user_group(value: Any) -> str:
    _expect(str, value, 'a "user:group" string')
    if not value:
        return value
    parts = value.split(":")
    if len(parts) > 2 or not all(_USER.match(p) for p in parts):
        raise ValueError('expected "user" or "user:group"')
    return value


def boolean_value(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str):
        return boolean(value)
    raise ValueError("expected true or false")


def environment(value: Any) -> dict:
    _expect(dict, value, "a table of NAME = \"value\"")
    out = {}
    for key, val in value.items():
        if not _ENV_KEY.match(key):
            raise ValueError("environment name %r is not [A-Za-z_][A-Za-z0-9_]*" % key)
        if not isinstance(val, str):
            raise ValueError("environment value of %s must be a string" % key)
        if any(ord(c) < 32 or ord(c) == 127 for c in val):
            raise ValueError("environment value of %s contains a control character" % key)
        out[key] = val
    return out


def socket_address(value: Any) -> str:
    """``unix:///absolute/path`` or ``tcp://host:port``; "" means the default unix socket."""
    _expect(str, value, 'a socket like "unix:///run/app/fcgi.sock" or "tcp://127.0.0.1:9000"')
    if value == "":
        return value
    if value.startswith("unix://"):
        path = value[len("unix://"):]
        if not path.startswith("/"):
            raise ValueError("a unix socket path must be absolute (unix:///path)")
        safe_path(path)
        if len(path.encode()) > 100:
            raise ValueError("a unix socket path must be at most 100 bytes")
        return value
    if value.startswith("tcp://"):
        m = _HOST_PORT.match(value[len("tcp://"):])
        if not m or not m.group("host") or not 0 < int(m.group("port")) < 65536:
            raise ValueError("expected tcp://host:port")
        return value
    raise ValueError('expected "unix:///absolute/path" or "tcp://host:port"')


def listen_address(value: Any) -> str:
    """nginx ``listen``: "host:port", "[::1]:port" or "port"."""
    _expect(str, value, 'an address like "127.0.0.1:8080"')
    m = _HOST_PORT.match(value)
    if not m or not 0 < int(m.group("port")) < 65536:
        raise ValueError('expected "host:port", "[v6]:port" or "port"')
    return value


def optional_listen_address(value: Any) -> str:
    return "" if value == "" else listen_address(value)


def loopback_address(value: str) -> tuple[str, int]:
    """(host, port) to bind for ``metrics.listen``; ValueError unless it is loopback.

    ``"9100"`` binds 127.0.0.1; ``"localhost:9100"`` too; IPv6 as ``"[::1]:9100"``.
    """
    if not value:
        raise ValueError("metrics are off (empty); set metrics.listen to e.g. 127.0.0.1:9100")
    host, sep, port_text = value.rpartition(":")
    if not sep:
        host, port_text = "127.0.0.1", value
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if host == "localhost":
        host = "127.0.0.1"
    try:
        port = int(port_text)
    except ValueError:
        raise ValueError("expected host:port") from None
    if not 0 < port < 65536:
        raise ValueError("port out of range")
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        raise ValueError("give a loopback IP address (127.0.0.1 or [::1]), not a host name") from None
    if not loopback:
        raise ValueError("refusing to serve metrics on a non-loopback address; "
                         "use 127.0.0.1:PORT or [::1]:PORT (put a proxy in front to publish them)")
    return host, port


def metrics_address(value: Any) -> str:
    """metrics.listen: "" (off) or a loopback "host:port"."""
    _expect(str, value, 'an address like "127.0.0.1:9100"')
    if value:
        listen_address(value)
        loopback_address(value)
    return value


def server_names(value: Any) -> str:
    _expect(str, value, "a string of server names")
    names = value.split(" ")
    if not value or not all(_SERVER_NAME.match(n) for n in names):
        raise ValueError("expected server names separated by single spaces")
    return value


def url_prefix(value: Any) -> str:
    _expect(str, value, 'a URL prefix like "/" or "/wiki/"')
    if not _URL_PREFIX.match(value):
        raise ValueError('expected a URL prefix that starts and ends with "/", like "/wiki/"')
    return value


def static_map(value: Any) -> dict:
    _expect(dict, value, 'a table of "/url/" = "directory/"')
    out = {}
    for prefix, directory in value.items():
        try:
            url_prefix(prefix)
        except ValueError as exc:
            raise ValueError("static key %r: %s" % (prefix, exc)) from None
        if prefix == "/":
            raise ValueError('static key "/" would hide the application')
        try:
            safe_path(directory)
        except ValueError as exc:
            raise ValueError("static directory %r: %s" % (directory, exc)) from None
        out[prefix] = directory
    return out


def path_list(value: Any) -> list:
    _expect(list, value, "a list of paths")
    for item in value:
        safe_path(item)
    return list(value)


def command_line(value: Any) -> list:
    """A command as a list of arguments (run without a shell, never rendered into a config)."""
    _expect(list, value, "a list of arguments, like [\"sudo\", \"systemctl\", \"reload\", \"nginx\"]")
    for item in value:
        if not isinstance(item, str) or not item or any(ord(c) < 32 or ord(c) == 127 for c in item):
            raise ValueError("expected non-empty arguments without control characters")
    return list(value)


def plain_text(value: Any) -> str:
    """A credential or similar value: printable, no whitespace, quotes or '%'."""
    _expect(str, value, "a string")
    if any(ord(c) <= 32 or ord(c) == 127 or c in "\"'\\%;#" for c in value):
        raise ValueError("expected printable text without whitespace, quotes, backslash, '%', ';' or '#'")
    return value


def ip_literal(value: Any) -> str:
    """An IP address literal, returned in canonical form ("::1", "10.0.0.5")."""
    _expect(str, value, "an IP address")
    try:
        return str(ipaddress.ip_address(value))
    except ValueError:
        raise ValueError("expected an IP address (a host name could resolve to anything)") from None


def ip_list(value: Any) -> list:
    """A list of IP address literals, canonical, in the order given."""
    _expect(list, value, 'a list of IP addresses like ["10.0.0.5"]')
    out = []
    for item in value:
        try:
            out.append(ip_literal(item))
        except ValueError as exc:
            raise ValueError("%r: %s" % (item, exc)) from None
    return out


def host_address(value: Any) -> str:
    """A host's worker socket, "IPv4:port": a specific address, never a wildcard.

    IPv4 only because supervisord's ``tcp://`` sockets are AF_INET.
    """
    _expect(str, value, 'an address like "10.0.0.11:9000"')
    ip_text, sep, port_text = value.rpartition(":")
    if not sep or not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ValueError('expected "IPv4:port", like "10.0.0.11:9000"')
    try:
        ip = ipaddress.ip_address(ip_text)
    except ValueError:
        raise ValueError("expected an IPv4 address, not a host name") from None
    if ip.version != 4:
        raise ValueError("supervisord binds tcp:// sockets on IPv4 only")
    if ip.is_unspecified:
        raise ValueError("0.0.0.0 would listen on every interface; give the host's own address")
    return "%s:%d" % (ip, int(port_text))


def one_of(*choices: str) -> Callable[[Any], str]:
    """A converter admitting exactly ``choices`` (strings)."""
    def convert(value: Any) -> str:
        _expect(str, value, "one of %s" % ", ".join('"%s"' % c for c in choices))
        if value not in choices:
            raise ValueError("expected one of %s" % ", ".join('"%s"' % c for c in choices))
        return value
    convert.__name__ = "one_of_" + "_".join(choices)
    return convert


#: The web servers a site file is rendered for (``web.server``).
WEB_SERVERS = ("nginx", "apache", "lighttpd", "caddy")
web_server = one_of(*WEB_SERVERS)
path_info_source = one_of("request_uri", "web_server")

