"""The deployment file's commands: ``init``, ``check`` and ``settings-table``.

``check`` imports the application by default, in a subprocess run by
``app.python`` with the workers' directory and environment: an app that does
not import is the most common deployment failure, and finding it here costs
a second while finding it at worker start costs a restart loop.  Pass
``--no-import`` where the app's dependencies are not installed (a build
host); the file is still fully validated and rendered in memory.

Exit statuses: 0 valid; 2 invalid deployment file (cli.main turns
ConfigError into 2); 1 the app does not import or is not callable; 1 for
``init`` refusing to overwrite.
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from typing import Any, Optional

from fcgi_toolkit import converters, settings
from fcgi_toolkit.settings import HOST_REGISTRY, REGISTRY, REQUIRED, ConfigError, Setting

IMPORT_TIMEOUT = 120.0

# Run by app.python: import module:callable the way a worker does.
_IMPORT_PROBE = r"""
import importlib, os, sys, traceback
directory, ref = sys.argv[1], sys.argv[2]
os.chdir(directory)
sys.path.insert(0, directory)
module_name, _, attr = ref.partition(":")
try:
    obj = importlib.import_module(module_name)
    for part in attr.split("."):
        obj = getattr(obj, part)
except BaseException:
    traceback.print_exc()
    sys.exit(3)
if not callable(obj):
    print("%s is a %s, not a WSGI callable" % (ref, type(obj).__name__), file=sys.stderr)
    sys.exit(4)
"""


# -- init -----------------------------------------------------------------

def _toml_value(setting: Setting, value: Any) -> str:
    if setting.convert is converters.seconds and isinstance(value, (int, float)):
        return '"%gs"' % value
    if setting.convert is converters.size and isinstance(value, int) and value >= 1024:
        for unit, factor in (("GB", 1 << 30), ("MB", 1 << 20), ("KB", 1 << 10)):
            if value % factor == 0:
                return '"%d%s"' % (value // factor, unit)
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return '"%s"' % value  # allow-listed values: no quotes or backslashes
    if isinstance(value, list):
        return "[" + ", ".join('"%s"' % v for v in value) + "]"
    if isinstance(value, dict):
        if not value:
            return "{}"
        return "{ " + ", ".join('"%s" = "%s"' % kv for kv in value.items()) + " }"
    raise TypeError(value)


def starter(wsgi: str, name: str) -> str:
    """A starter deploy.toml: the two required keys set, every other key a comment."""
    lines = ["# Deployment file for %s, written by `fcgi-toolkit init`." % wsgi,
             "# Every setting is listed with its default; uncomment to change.",
             "# Reference: `fcgi-toolkit settings-table` or README.rst."]
    section = None
    for s in REGISTRY:
        if s.section != section:
            section = s.section
            lines += ["", "[%s]" % section]
        lines.append("# %s" % s.help)
        if s.key == "app.name":
            lines.append('name = "%s"' % name)
        elif s.key == "app.wsgi":
            lines.append('wsgi = "%s"' % wsgi)
        else:
            shown = s.example if s.example is not None and not s.default else s.default
            note = "  (default %s)" % _toml_value(s, s.default) if shown is not s.default else ""
            lines.append("# %s = %s%s" % (s.name, _toml_value(s, shown), note))
    return "\n".join(lines + hosts_example()) + "\n"


def hosts_example() -> list[str]:
    """The starter's commented ``[[hosts]]`` table, from HOST_REGISTRY."""
    lines = ["", "# Several hosts behind one nginx (README: Several hosts): one [[hosts]] table per",
             "# machine running the workers; then nginx.web_servers is required and",
             "# workers.socket must be left out.  With control.inet_port (a port only) and",
             "# credentials, `fcgi-toolkit status` on the web server shows every host.",
             "# [[hosts]]"]
    for s in HOST_REGISTRY:
        lines.append("# %s" % s.help)
        if s.default is REQUIRED:
            lines.append("# %s = %s" % (s.name, _toml_value(s, s.example)))
        elif s.default is None:   # derived (count: workers.count)
            lines.append("# %s = %d  # default: workers.count" % (s.name, 2))
        else:
            lines.append("# %s = %s" % (s.name, _toml_value(s, s.default)))
    return lines


def default_name(wsgi: str) -> str:
    """A group name from the app's top module: "Wiki-App.wsgi:app" -> "wiki_app"."""
    top = wsgi.partition(":")[0].split(".")[0].lower()
    cleaned = re.sub(r"[^a-z0-9_]", "_", top).strip("_")
    if not cleaned or not cleaned[0].isalpha():
        cleaned = "app_" + cleaned
    return cleaned[:40]


def write_new(path: str, text: str, force: bool) -> None:
    """Write ``text`` to ``path`` atomically; without ``force`` never replace a file."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".deploy.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, 0o644)
        if force:
            os.replace(tmp, path)
        else:
            os.link(tmp, path)  # fails with FileExistsError: no clobbering, no race
    finally:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass


def add_arguments_init(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("wsgi", metavar="MODULE:CALLABLE", help="the WSGI application")
    parser.add_argument("-o", "--output", default="deploy.toml", help="file to write (default: %(default)s)")
    parser.add_argument("--name", default=None, help="group name (default: from the module name)")
    parser.add_argument("--force", action="store_true", help="overwrite an existing file")


def run_init(args: argparse.Namespace) -> int:
    name = args.name if args.name is not None else default_name(args.wsgi)
    for key, convert, value in (("app.wsgi", converters.wsgi_ref, args.wsgi), ("app.name", converters.name, name)):
        try:
            convert(value)
        except ValueError as exc:
            raise ConfigError("(command line): %s = %r: %s" % (key, value, exc)) from None
    text = starter(args.wsgi, name)
    # Validate what we are about to write, exactly as `check` will read it.
    settings.parse(settings.tomllib.loads(text), os.path.abspath(args.output))
    try:
        write_new(args.output, text, args.force)
    except FileExistsError:
        print("fcgi-toolkit: %s exists; use --force to overwrite it" % args.output, file=sys.stderr)
        return 1
    print("wrote %s (app %s, group %s); next: fcgi-toolkit check -c %s && fcgi-toolkit run -c %s"
          % (args.output, args.wsgi, name, args.output, args.output))
    return 0


# -- check ----------------------------------------------------------------

def import_app(dep: settings.Deployment, timeout: float = IMPORT_TIMEOUT) -> Optional[str]:
    """Import the app as a worker would, in a subprocess; None if fine, else the error text."""
    env = dict(os.environ)
    env.update(dep.app.environment)
    try:
        r = subprocess.run([dep.python, "-c", _IMPORT_PROBE, dep.app.directory, dep.app.wsgi],
                           cwd=dep.app.directory, env=env, stdin=subprocess.DEVNULL,
                           capture_output=True, text=True, timeout=timeout)
    except FileNotFoundError as exc:
        return "cannot run app.python %s: %s" % (dep.python, exc.strerror)
    except subprocess.TimeoutExpired:
        return "importing %s took longer than %.0f s" % (dep.app.wsgi, timeout)
    if r.returncode != 0:
        return r.stderr.strip() or "exit status %d" % r.returncode
    return None


def add_arguments_check(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-c", "--config", default="deploy.toml", help="deployment file (default: %(default)s)")
    parser.add_argument("--import", dest="import_app", action=argparse.BooleanOptionalAction, default=True,
                        help="import the app with app.python (default: yes)")


def run_check(args: argparse.Namespace) -> int:
    from fcgi_toolkit import render

    dep = settings.load(args.config)
    host = render.Host.probe(dep)
    render.render_all(dep, host, dep.runtime_dir)
    warning = render.capacity_warning(dep, host)
    if warning:
        print("fcgi-toolkit: warning: %s" % warning, file=sys.stderr)
    if not os.path.isdir(dep.app.directory):
        raise ConfigError("%s: app.directory = %r: no such directory" % (dep.path, dep.app.directory))
    if args.import_app:
        error = import_app(dep)
        if error:
            print("fcgi-toolkit: %s: app.wsgi = %r: the app does not import:\n%s"
                  % (dep.path, dep.app.wsgi, error), file=sys.stderr)
            return 1
    if dep.multi_host and dep.host is None:
        where = "hosts %s" % ", ".join("%s %s (%d workers)" % (h.name, h.address, h.count)
                                       for h in dep.hosts)
        print("%s: ok (%s, %s, %d standby each%s)" % (
            dep.path, dep.app.wsgi, where, dep.workers.standby,
            "" if args.import_app else ", import not checked"))
        return 0
    print("%s: ok (%s, %d workers + %d standby, socket %s%s)" % (
        dep.path, dep.app.wsgi, dep.workers.count, dep.workers.standby, dep.socket_url,
        "" if args.import_app else ", import not checked"))
    return 0


# -- settings-table ---------------------------------------------------------

def run_settings_table(args: argparse.Namespace) -> int:
    sys.stdout.write(settings.settings_table())
    return 0
