"""The one nginx every contender sits behind.

Every contender gets the same configuration shape (:func:`render`); only the
FastCGI socket path and the listen port differ.  nginx runs in the
foreground with one worker process, logs every request's completion time
and status when ``access_log`` is on (that log is the per-second timeline of
the reload and recycle scenarios) and is stopped with SIGQUIT so its
buffered log is flushed.
"""
from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from typing import Optional

# The FastCGI parameters nginx passes: the same for every contender, inline so
# the bench does not depend on the distribution's fastcgi_params file.
_PARAMS = (
    ("QUERY_STRING", "$query_string"), ("REQUEST_METHOD", "$request_method"),
    ("CONTENT_TYPE", "$content_type"), ("CONTENT_LENGTH", "$content_length"),
    ("SCRIPT_NAME", '""'), ("PATH_INFO", "$uri"), ("REQUEST_URI", "$request_uri"),
    ("SERVER_PROTOCOL", "$server_protocol"), ("REQUEST_SCHEME", "$scheme"),
    ("GATEWAY_INTERFACE", "CGI/1.1"), ("SERVER_SOFTWARE", "nginx"),
    ("REMOTE_ADDR", "$remote_addr"), ("REMOTE_PORT", "$remote_port"),
    ("SERVER_ADDR", "$server_addr"), ("SERVER_PORT", "$server_port"),
    ("SERVER_NAME", "$server_name"),
)


def free_port() -> int:
    """A free loopback TCP port (bind port 0, read it, release it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def render(workdir: str, port: int, fcgi_socket: str, keepalive: int = 0,
           access_log: bool = False, protocol: str = "fastcgi") -> str:
    """nginx.conf text for one contender: loopback listen, one upstream on a
    unix socket, spoken to in FastCGI or (``protocol="http"``, gunicorn) HTTP."""
    lines = []
    if os.geteuid() == 0:
        # As root nginx would drop its worker to "nobody", which cannot open
        # the contenders' 0660/0700 sockets; keep the invoking user.
        user = pwd.getpwuid(os.geteuid()).pw_name
        lines.append("user %s;" % user)
    tmp = os.path.join(workdir, "nginx-tmp")
    lines += [
        "daemon off;",
        "master_process on;",
        "worker_processes 1;",
        "pid %s;" % os.path.join(workdir, "nginx.pid"),
        "error_log %s warn;" % os.path.join(workdir, "nginx-error.log"),
        "events { worker_connections 1024; }",
        "http {",
        "  log_format bench '$msec $status $request_time';",
    ]
    if access_log:
        lines.append("  access_log %s bench buffer=256k flush=1s;" % os.path.join(workdir, "access.log"))
    else:
        lines.append("  access_log off;")
    for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"):
        lines.append("  %s_temp_path %s;" % (kind, os.path.join(tmp, kind)))
    lines += [
        "  keepalive_timeout 65;",
        "  upstream app {",
        "    server unix:%s;" % fcgi_socket,
    ]
    if keepalive:
        lines.append("    keepalive %d;" % keepalive)
    lines += [
        "  }",
        "  server {",
        "    listen 127.0.0.1:%d;" % port,
        "    location / {",
    ]
    if protocol == "http":
        if keepalive:
            lines += ["      proxy_http_version 1.1;", '      proxy_set_header Connection "";']
        lines += [
            "      proxy_connect_timeout 5s;",
            "      proxy_read_timeout 60s;",
            "      proxy_pass http://app;",
        ]
    else:
        lines += ['      fastcgi_param %s %s;' % (k, v) for k, v in _PARAMS]
        if keepalive:
            lines.append("      fastcgi_keep_conn on;")
        lines += [
            "      fastcgi_connect_timeout 5s;",
            "      fastcgi_read_timeout 60s;",
            "      fastcgi_pass app;",
        ]
    lines += [
        "    }",
        "  }",
        "}",
    ]
    return "\n".join(lines) + "\n"


@dataclass
class Nginx:
    """A running nginx in ``workdir`` listening on 127.0.0.1:``port``."""
    workdir: str
    port: int
    proc: Optional[subprocess.Popen] = None

    @property
    def url(self) -> str:
        return "http://127.0.0.1:%d/" % self.port

    @property
    def access_log(self) -> str:
        return os.path.join(self.workdir, "access.log")

    def start(self, fcgi_socket: str, keepalive: int = 0, access_log: bool = False,
              timeout: float = 10.0, protocol: str = "fastcgi") -> "Nginx":
        binary = shutil.which("nginx") or "/usr/sbin/nginx"
        os.makedirs(os.path.join(self.workdir, "nginx-tmp"), exist_ok=True)
        conf = os.path.join(self.workdir, "nginx.conf")
        with open(conf, "w") as f:
            f.write(render(self.workdir, self.port, fcgi_socket, keepalive, access_log, protocol))
        err = open(os.path.join(self.workdir, "nginx-stderr.log"), "ab")
        # -e: nginx >= 1.19.5 opens its default error log before reading the
        # config; point it into the workdir so a non-root run works too.
        self.proc = subprocess.Popen(
            [binary, "-c", conf, "-p", self.workdir, "-e", os.path.join(self.workdir, "nginx-error.log")],
            stdout=err, stderr=err, start_new_session=True)
        err.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError("nginx exited %s; see %s" % (self.proc.returncode, self.workdir))
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                return self
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError("nginx did not listen on %d within %.0fs" % (self.port, timeout))

    def stop(self, timeout: float = 10.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGQUIT)   # graceful: flushes the buffered access log
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(5)

    def reopen_log(self) -> None:
        """Start a fresh access log (rename the old one, SIGUSR1 makes nginx reopen)."""
        if os.path.exists(self.access_log):
            os.replace(self.access_log, self.access_log + ".old")
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGUSR1)
            time.sleep(0.2)


def timeline(path: str, start: float, end: float, bin_seconds: float = 1.0) -> list[dict]:
    """Per-bin completed and failed (status >= 400) requests from a bench access log.

    Returns ``[{"t": seconds since start, "ok": n, "failed": n}, ...]`` for
    every bin between ``start`` and ``end`` (epoch seconds), empty bins included.
    """
    nbins = max(1, int((end - start) / bin_seconds))   # whole bins only: the last partial one would read as a dip
    bins = [{"t": round(i * bin_seconds, 3), "ok": 0, "failed": 0} for i in range(nbins)]
    try:
        f = open(path)
    except FileNotFoundError:
        return bins
    with f:
        for line in f:
            parts = line.split()
            if len(parts) < 2:
                continue
            try:
                t, status = float(parts[0]), int(parts[1])
            except ValueError:
                continue
            i = int((t - start) / bin_seconds)
            if 0 <= i < nbins:
                bins[i]["failed" if status >= 400 else "ok"] += 1
    return bins
