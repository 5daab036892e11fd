"""Command line: ``fcgi-toolkit COMMAND`` and ``python -m fcgi_toolkit COMMAND``.

Each command lives in the module of the moving part it drives; that module
provides ``add_arguments(parser)`` and ``run(args) -> int``.  Modules are
imported only when their command runs, so ``check`` imports neither flup nor
the application.
"""
from __future__ import annotations

import argparse
import importlib
import sys
from typing import Optional, Sequence

from fcgi_toolkit.settings import ConfigError

# command -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "init": ("fcgi_toolkit.deployfile", "write a starter deploy.toml for module:callable"),
    "check": ("fcgi_toolkit.deployfile", "validate a deployment file (and that the app imports)"),
    "render": ("fcgi_toolkit.render", "render supervisord.conf and nginx configs into a directory"),
    "run": ("fcgi_toolkit.runner", "render into the runtime dir and run supervisord in the foreground"),
    "install": ("fcgi_toolkit.install", "add the deployment to the distribution's supervisord and nginx "
                                        "(or --systemd: a unit running `run`)"),
    "uninstall": ("fcgi_toolkit.install", "remove what install wrote"),
    "demo": ("fcgi_toolkit.runner", "run a built-in demo app behind nginx with zero configuration"),
    "worker": ("fcgi_toolkit.worker", "serve the app on the inherited FastCGI socket (used by supervisord)"),
    "listener": ("fcgi_toolkit.listener", "the watchdog event listener (used by supervisord)"),
    "status": ("fcgi_toolkit.status", "show every worker slot: state, RSS, requests, in-flight request"),
    "stop": ("fcgi_toolkit.leftovers", "stop a deployment: supervisord's graceful shutdown, then anything left"),
    "recycle": ("fcgi_toolkit.control", "gracefully replace one worker, capacity held"),
    "reload": ("fcgi_toolkit.control", "rolling restart of every worker, capacity held"),
    "apply": ("fcgi_toolkit.applying", "apply the changes of the deployment file to the running deployment"),
    "metrics": ("fcgi_toolkit.metrics", "serve Prometheus metrics of the group (used by supervisord)"),
    "lifeline": ("fcgi_toolkit.lifeline", "exec a program that stops when supervisord dies (used by supervisord)"),
    "settings-table": ("fcgi_toolkit.deployfile", "print the settings table for README.rst"),
}


def build_parser(selected: Optional[str] = None) -> argparse.ArgumentParser:
    """The parser; only ``selected``'s module is imported to add its arguments."""
    parser = argparse.ArgumentParser(
        prog="fcgi-toolkit",
        description="Deploy WSGI apps as FastCGI workers under supervisord behind nginx.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for command, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(command, help=help_text, description=help_text)
        p.set_defaults(_module=module)
        if command == selected:
            mod = importlib.import_module(module)
            getattr(mod, "add_arguments_" + command.replace("-", "_"),
                    getattr(mod, "add_arguments", lambda _p: None))(p)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    selected = next((a for a in argv if not a.startswith("-")), None)
    args = build_parser(selected).parse_args(argv)
    mod = importlib.import_module(args._module)
    func = getattr(mod, "run_" + args.command.replace("-", "_"), None) or getattr(mod, "run")
    try:
        return int(func(args) or 0)
    except ConfigError as exc:
        print("fcgi-toolkit: %s" % exc, file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
