"""What we need to know about the distribution's supervisord.conf.

A deployment added to an existing supervisord (``fcgi-toolkit install``,
``control.system_supervisord``) reaches it the way that supervisord's own
``supervisorctl`` does: through the ``[supervisorctl]`` section of its main
file (``serverurl``, ``username``, ``password``), read by supervisor's own
parser (:class:`supervisor.options.ClientOptions`), so ``%(here)s`` and
environment expansions mean what they mean to supervisorctl.

Facts (supervisor 4.3.0, ``supervisor/options.py``): supervisord merges the
files of ``[include] files`` into the main file before it reads any section,
so an included file may define ``[rpcinterface:x]`` and programs; but
supervisorctl (``ClientOptions.read_config``) reads the main file only,
never its includes, so a ``[ctlplugin:x]`` in an included file is ignored.
"""
from __future__ import annotations

import configparser
import fnmatch
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from fcgi_toolkit.settings import Deployment


@dataclass(frozen=True)
class ClientSettings:
    """How supervisorctl reaches a supervisord (its ``[supervisorctl]`` section)."""
    serverurl: str
    username: str
    password: str


def control_client(dep: "Deployment") -> ClientSettings:
    """How operator commands reach the deployment's supervisord: the
    distribution's (control.system_supervisord: its [supervisorctl]) or the
    toolkit's own (the private unix socket in runtime.dir)."""
    from fcgi_toolkit.settings import ConfigError
    main = dep.control.system_supervisord
    if not main:
        return ClientSettings("unix://" + dep.control_socket, "", "")
    try:
        return client_settings(main)
    except SupervisorConfError as exc:
        raise ConfigError("%s: control.system_supervisord = %r: %s" % (dep.path, main, exc)) from None


class SupervisorConfError(ValueError):
    """The distribution's supervisord.conf cannot be used: the message says why."""


def client_settings(path: str) -> ClientSettings:
    """``[supervisorctl]`` of ``path``, read by supervisor's own parser."""
    from supervisor.options import ClientOptions

    if not os.path.isfile(path):
        raise SupervisorConfError("no such file")
    options = ClientOptions()
    try:
        section = options.read_config(path)
    except ValueError as exc:   # supervisor's parser reports every problem as ValueError
        raise SupervisorConfError(str(exc).splitlines()[0]) from None
    except OSError as exc:
        raise SupervisorConfError("cannot read: %s" % exc.strerror) from None
    return ClientSettings(section.serverurl, section.username or "", section.password or "")


def include_patterns(path: str) -> list[str]:
    """The absolute glob patterns of ``[include] files`` (relative ones are
    relative to the main file's directory, as supervisord reads them)."""
    parser = configparser.RawConfigParser(inline_comment_prefixes=(";", "#"), strict=False)
    try:
        with open(path, encoding="utf-8") as f:
            parser.read_file(f)
    except OSError as exc:
        raise SupervisorConfError("cannot read: %s" % exc.strerror) from None
    except configparser.Error as exc:
        raise SupervisorConfError("not a supervisord.conf: %s" % str(exc).splitlines()[0]) from None
    if not parser.has_option("include", "files"):
        return []
    here = os.path.dirname(os.path.abspath(path))
    return [os.path.normpath(os.path.join(here, p.replace("%(here)s", here)))
            for p in parser.get("include", "files").split()]


def fragment_path(patterns: list[str], filename: str, conf_dir: str = "") -> str:
    """Where the fragment ``filename`` goes so that an include pattern picks it up.

    ``conf_dir`` given: that directory, if a pattern matches the file there;
    else the directory of the first pattern (``/etc/supervisor/conf.d/*.conf``)
    that matches it.  "" if none does.
    """
    dirs = [os.path.abspath(conf_dir)] if conf_dir else [os.path.dirname(p) for p in patterns]
    for directory in dirs:
        candidate = os.path.join(directory, filename)
        if any(fnmatch.fnmatchcase(candidate, p) for p in patterns):
            return candidate
    return ""
