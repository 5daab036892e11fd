"""Running a deployment in the foreground: commands ``run`` and ``demo``.

``run`` renders the configs into the runtime dir, creates the scoreboard and
starts ``supervisord -n`` as a child in its own session.  SIGINT and SIGTERM
received by this process are forwarded to supervisord (the handlers only
record the signal; the wait loop forwards it), which stops nginx, the
watchdog and the workers gracefully.  SIGHUP means apply: the wait loop runs
``fcgi-toolkit apply -c FILE`` (one at a time; a HUP during an apply runs
another one after it), and the deployment keeps serving.  When supervisord
has exited, a socket file it left behind is removed and its exit status
becomes ours.  Before it starts supervisord, ``run`` ends what a supervisord
killed hard left behind and refuses (exit 2) an address held by another
program (:mod:`fcgi_toolkit.leftovers`).  If ``run`` itself is killed,
supervisord (its own session) keeps running: ``fcgi-toolkit stop`` stops it.

With ``[[hosts]]``, ``run`` runs one host: ``FCGI_TOOLKIT_HOST=NAME
fcgi-toolkit run`` starts that host's supervisord (workers, watchdog, no
nginx).  The web server's nginx is not run by ``run``: it refuses the front
view and says what to do instead.

``demo`` writes a deployment file for the built-in demo app
(:mod:`fcgi_toolkit.demo`) into a fresh temporary directory and runs it.
"""
from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from typing import Optional, TextIO

from fcgi_toolkit import applying, generations, leftovers, render, respawn, settings
from fcgi_toolkit.settings import ConfigError, Deployment

_FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def prepare(dep: Deployment, host: Optional[render.Host] = None) -> list[str]:
    """Render the configs, check a managed nginx can reach its files, create
    the runtime and log dirs and the scoreboard, write the configs."""
    from fcgi_toolkit import scoreboard

    host = host or render.Host.probe(dep)
    files = render.render_all(dep, host, dep.runtime_dir)
    if dep.nginx.managed and not dep.multi_host:
        check_nginx_reach(dep, host)
    for directory in (dep.runtime_dir, dep.log_dir):
        os.makedirs(directory, mode=0o755, exist_ok=True)
    scoreboard.create(dep.scoreboard_path, dep.slots)
    written = render.write_rendered(dep, files, dep.runtime_dir)
    applying.save(dep, applying.values(dep))    # what this run applies: `apply` diffs against it
    generations.reset(dep)                      # a fresh supervisord serves generation 1
    return written


def prepare_run(dep: Deployment, data: bytes, host: Optional[render.Host] = None) -> Deployment:
    """:func:`prepare` as ``run`` does it: the processes read ``applied.toml``
    (the file's ``data`` now, what each ``apply`` makes it later), so an edit
    of the file takes effect only through ``apply``.  Returns that view."""
    dep = respawn.pinned(dep)
    prepare(dep, host)
    respawn.record_start(dep, data)
    return dep


def supervisord_command(dep: Deployment) -> list[str]:
    return [sys.executable, "-m", "supervisor.supervisord", "-n", "-c", dep.supervisord_conf]


def check_runnable(dep: Deployment) -> None:
    """Refuse early, with one line, what supervisord would only log."""
    if dep.multi_host and dep.host is None:
        raise ConfigError(
            "%s: [[hosts]]: run starts one host, not the web server; on the web server run nginx "
            "with the rendered files (fcgi-toolkit render -c %s; nginx -c .../nginx.conf), on each "
            "host: FCGI_TOOLKIT_HOST=NAME fcgi-toolkit run -c %s (hosts: %s)"
            % (dep.path, dep.path, dep.path, ", ".join(dep.host_names())))
    if dep.control.system_supervisord:
        raise ConfigError(
            "%s: control.system_supervisord = %r: this deployment runs in that supervisord "
            "(fcgi-toolkit install); run starts a supervisord of its own: remove the setting to use run"
            % (dep.path, dep.control.system_supervisord))
    if dep.multi_host:
        return  # a host's supervisord never runs nginx (nginx.managed is single-host only)
    if dep.nginx.managed and not render.find_nginx(dep.nginx.binary):
        raise ConfigError("%s: nginx.managed = true: no nginx executable found; install nginx, "
                          "set nginx.binary, or set nginx.managed = false" % dep.path)


def check_nginx_reach(dep: Deployment, host: render.Host) -> None:
    """A root-started nginx runs its workers unprivileged: refuse a socket
    or static directory that user cannot enter (nginx would answer 502/403)."""
    from fcgi_toolkit import webuser
    identity = render.nginx_identity(dep, host)
    if identity is not None:
        webuser.check_reach(dep, identity.user, identity.group, "nginx's workers", runtime_dir=True)


def banner(dep: Deployment) -> str:
    lines = ["fcgi-toolkit: running %s%s (%d workers + %d standby)"
             % (dep.name, " on host %s" % dep.host.name if dep.host else "",
                dep.workers.count, dep.workers.standby)]
    if dep.nginx.managed and not dep.multi_host:
        lines.append("  open:    http://%s%s" % (_http_host(dep.nginx.listen), dep.nginx.location))
    lines.append("  socket:  %s" % dep.socket_url)
    if dep.host is not None:
        lines.append("  nginx:   on the web server (%s), with fcgi-toolkit render's nginx files"
                     % ", ".join(dep.nginx.web_servers))
    lines.append("  logs:    %s" % dep.log_dir)
    lines.append("  control: supervisorctl -c %s status" % dep.supervisord_conf)
    lines.append("  apply:   fcgi-toolkit apply -c %s (or kill -HUP %d)" % (dep.path, os.getpid()))
    lines.append("  stop:    Ctrl-C (or kill -TERM %d, or fcgi-toolkit stop -c %s)"
                 % (os.getpid(), dep.path))
    return "\n".join(lines)


def _http_host(listen: str) -> str:
    return listen if ":" in listen else "127.0.0.1:" + listen


def supervise(dep: Deployment, stream: TextIO = sys.stderr) -> int:
    """Run supervisord in the foreground until it exits; return its status."""
    received: list[int] = []

    def on_signal(signum, _frame):
        received.append(signum)

    previous = {sig: signal.signal(sig, on_signal) for sig in _FORWARDED}
    applying_proc: Optional[subprocess.Popen] = None
    try:
        # Own session: a terminal's Ctrl-C reaches only us, and we forward
        # exactly one signal, so supervisord sees one clean shutdown request.
        # RUN_ENV: the host's fcgi.respawn() knows a run will start it again.
        proc = subprocess.Popen(supervisord_command(dep), start_new_session=True,
                                stdin=subprocess.DEVNULL,
                                env=dict(os.environ, **{respawn.RUN_ENV: str(os.getpid())}))
        print(banner(dep), file=stream, flush=True)
        forwarded = 0
        apply_again = False
        while True:
            try:
                status = proc.wait(timeout=0.2)
                break
            except subprocess.TimeoutExpired:
                pass
            while forwarded < len(received):
                sig = received[forwarded]
                forwarded += 1
                if sig == signal.SIGHUP:
                    # HUP means "apply the deployment file" (systemctl reload),
                    # never supervisord's own restart, which closes the socket.
                    apply_again = True
                else:
                    proc.send_signal(sig)
            if applying_proc is not None and applying_proc.poll() is not None:
                applying_proc = None
            if apply_again and applying_proc is None:
                apply_again = False
                applying_proc = subprocess.Popen(applying.apply_command(dep.path),
                                                 stdin=subprocess.DEVNULL)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if applying_proc is not None and applying_proc.poll() is None:
            applying_proc.terminate()       # supervisord is gone: nothing left to apply to
            applying_proc.wait(10)
    _remove_stale_socket(dep)
    if received:
        respawn.discard(dep)           # the operator stopped it: no new supervisord
        print("fcgi-toolkit: stopped (supervisord exit status %d)" % status, file=stream)
    elif status < 0:
        print("fcgi-toolkit: supervisord was killed (%s); its workers drain and exit by themselves; "
              "`fcgi-toolkit run -c %s` starts it again" % (signal.Signals(-status).name, dep.path),
              file=stream)
    # A negative status means supervisord died by a signal: report it shell-style.
    return status if status >= 0 else 128 - status


def _remove_stale_socket(dep: Deployment) -> None:
    for view in (dep, generations.serving(dep)):
        if view.socket_is_unix:
            try:
                os.unlink(view.socket_path)
            except FileNotFoundError:
                pass
    remains = leftovers.find(dep)
    if not remains.processes:          # an inner supervisord's files, once nothing runs
        leftovers.forget_inner_files(remains)


def add_arguments_run(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-c", "--config", default="deploy.toml", help="deployment file (default: %(default)s)")
    # A respawn's rollback: start these bytes as if they were the file (fcgi_toolkit.respawn).
    settings.add_start_from(parser)


def respawn_command(path: str, start_from: str) -> list[str]:
    """``run`` again, as a new process image (fcgi_toolkit.respawn)."""
    return ([sys.executable, "-m", "fcgi_toolkit", "run", "-c", os.path.abspath(path)]
            + (["--start-from", start_from] if start_from else []))


def already_running(dep: Deployment) -> bool:
    """Whether a supervisord answers on this deployment's control socket."""
    return leftovers.answers(dep.control_socket)


def run_run(args: argparse.Namespace) -> int:
    dep, data = respawn.load_for_start(args.config, args.start_from)
    check_runnable(dep)
    if already_running(dep):
        print("fcgi-toolkit: %s is already running (%s answers); stop it first "
              "(fcgi-toolkit stop -c %s)" % (dep.name, dep.control_socket, dep.path),
              file=sys.stderr)
        return 1
    # What a supervisord killed hard left behind; a foreign holder of an address: exit 2.
    leftovers.clear_for_start(dep)
    host = render.Host.probe(dep)
    dep = prepare_run(dep, data, host)
    warning = render.capacity_warning(dep, host)
    if warning:
        print("fcgi-toolkit: warning: %s" % warning, file=sys.stderr)
    status = supervise(dep)
    start_from = respawn.take(dep)
    if start_from is None:
        return status
    print("fcgi-toolkit: supervisord stopped for a new one (fcgi.respawn); starting %s again"
          % (start_from or args.config), file=sys.stderr, flush=True)
    sys.stdout.flush()
    os.execv(sys.executable, respawn_command(args.config, start_from))
    return status   # pragma: no cover - execv does not return


# -- demo -----------------------------------------------------------------

DEMO_TOML = """\
# Deployment of the built-in demo app, written by `fcgi-toolkit demo`.
[app]
name = "demo"
wsgi = "fcgi_toolkit.demo:application"
directory = "."

[workers]
count = 2
standby = 1
threads = 4
graceful_timeout = "10s"

[limits]
max_rss = "128MB"
max_requests = 1000
max_requests_jitter = 100
request_timeout = "60s"
slow_request = "10s"

[nginx]
listen = "{listen}"
managed = {managed}

[runtime]
dir = "run"
"""


def demo_toml(port: int, managed: bool) -> str:
    return DEMO_TOML.format(listen="127.0.0.1:%d" % port, managed="true" if managed else "false")


def add_arguments_demo(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--port", type=int, default=8080, help="nginx port on 127.0.0.1 (default: %(default)s)")
    parser.add_argument("--dir", default=None,
                        help="keep the demo's files here (default: a temporary directory removed on exit)")


def run_demo(args: argparse.Namespace) -> int:
    managed = bool(render.find_nginx())
    temporary = args.dir is None
    directory = tempfile.mkdtemp(prefix="fcgi-toolkit-demo-") if temporary else os.path.abspath(args.dir)
    os.makedirs(directory, exist_ok=True)
    if temporary:
        # mkdtemp makes it 0700; nginx's unprivileged workers must reach the socket in it.
        os.chmod(directory, 0o755)
    path = os.path.join(directory, "deploy.toml")
    try:
        with open(path, "w", encoding="utf-8") as f:
            f.write(demo_toml(args.port, managed))
        dep = settings.load(path)
        print("fcgi-toolkit demo: deployment file %s%s" % (
            path, " (temporary, removed on exit; --dir DIR keeps it)" if temporary else ""),
            file=sys.stderr)
        if not managed:
            print("fcgi-toolkit demo: nginx not found, so no HTTP server; talk FastCGI to the socket:\n"
                  "  SCRIPT_NAME= PATH_INFO=/ REQUEST_METHOD=GET QUERY_STRING= "
                  "cgi-fcgi -bind -connect %s" % dep.socket_path, file=sys.stderr)
        check_runnable(dep)
        leftovers.clear_for_start(dep)
        dep = prepare_run(dep, settings.read_bytes(path))
        return supervise(dep)
    finally:
        if temporary:
            shutil.rmtree(directory, ignore_errors=True)
