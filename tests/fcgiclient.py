"""A small FastCGI client for tests, and a launcher that starts a worker the
way supervisord's ``[fcgi-program]`` does (listening socket as fd 0).

Every socket operation has a timeout; nothing here talks to anything but
loopback TCP and unix sockets.

Server under test: ``FCGI_TOOLKIT_SERVER=flup`` runs bare flup6's WSGIServer
(``tests/flup_compare.py serve``) instead of ``fcgi-toolkit worker``, for the
comparison mode.
"""
from __future__ import annotations

import itertools
import os
import signal
import socket
import struct
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Optional, Union
from urllib.parse import quote

HERE = os.path.dirname(os.path.abspath(__file__))
APPS = os.path.join(HERE, "apps")

VERSION = 1
BEGIN_REQUEST, ABORT_REQUEST, END_REQUEST, PARAMS, STDIN, STDOUT, STDERR, DATA = range(1, 9)
GET_VALUES, GET_VALUES_RESULT, UNKNOWN_TYPE = 9, 10, 11
RESPONDER, AUTHORIZER, FILTER = 1, 2, 3
KEEP_CONN = 1
REQUEST_COMPLETE, CANT_MPX_CONN, OVERLOADED, UNKNOWN_ROLE = range(4)

HEADER = struct.Struct("!BBHHBx")
Address = Union[str, tuple]


def server_kind() -> str:
    return os.environ.get("FCGI_TOOLKIT_SERVER", "ours")


# --------------------------------------------------------------------------
# Encoding
# --------------------------------------------------------------------------

def record(rtype: int, rid: int, content: bytes = b"", padding: Optional[int] = None,
           version: int = VERSION) -> bytes:
    if padding is None:
        padding = -len(content) & 7
    return HEADER.pack(version, rtype, rid, len(content), padding) + content + b"\0" * padding


def encode_pairs(pairs: dict) -> bytes:
    out = bytearray()
    for name, value in pairs.items():
        n = name.encode("latin-1") if isinstance(name, str) else name
        v = value.encode("latin-1") if isinstance(value, str) else value
        for length in (len(n), len(v)):
            out += bytes([length]) if length < 128 else struct.pack("!L", length | 0x80000000)
        out += n + v
    return bytes(out)


def decode_pairs(data: bytes) -> dict:
    out, pos = {}, 0
    while pos < len(data):
        lengths = []
        for _ in range(2):
            if data[pos] & 0x80:
                lengths.append(struct.unpack_from("!L", data, pos)[0] & 0x7FFFFFFF)
                pos += 4
            else:
                lengths.append(data[pos])
                pos += 1
        name = data[pos:pos + lengths[0]]
        pos += lengths[0]
        out[name.decode("latin-1")] = data[pos:pos + lengths[1]].decode("latin-1")
        pos += lengths[1]
    return out


def cgi_params(uri: str, method: str = "GET", body: bytes = b"",
               extra: Optional[dict] = None) -> dict:
    """The params nginx's fastcgi_params would send (no PATH_INFO: the
    server derives it)."""
    path, _, query = uri.partition("?")
    params = {
        "GATEWAY_INTERFACE": "CGI/1.1", "SERVER_SOFTWARE": "fcgiclient",
        "REQUEST_METHOD": method, "REQUEST_URI": uri, "DOCUMENT_URI": path,
        "SCRIPT_NAME": "", "QUERY_STRING": query, "SERVER_PROTOCOL": "HTTP/1.1",
        "SERVER_NAME": "localhost", "SERVER_PORT": "80", "REMOTE_ADDR": "127.0.0.1",
        "REMOTE_PORT": "40000", "SERVER_ADDR": "127.0.0.1", "HTTP_HOST": "localhost",
    }
    if body or method in ("POST", "PUT"):
        params["CONTENT_LENGTH"] = str(len(body))
        params["CONTENT_TYPE"] = "application/octet-stream"
    params.update(extra or {})
    return params


# --------------------------------------------------------------------------
# Responses
# --------------------------------------------------------------------------

@dataclass
class Record:
    type: int
    request_id: int
    content: bytes


@dataclass
class Response:
    stdout: bytes = b""
    stderr: bytes = b""
    ended: bool = False              # FCGI_END_REQUEST seen
    app_status: Optional[int] = None
    protocol_status: Optional[int] = None
    eof: bool = False                # the server closed the connection
    reset: bool = False              # ... with a reset
    records: list = field(default_factory=list)

    @property
    def head(self) -> bytes:
        return self.stdout.partition(b"\r\n\r\n")[0]

    @property
    def body(self) -> bytes:
        return self.stdout.partition(b"\r\n\r\n")[2]

    @property
    def headers(self) -> list:
        out = []
        for line in self.head.split(b"\r\n"):
            if b":" in line:
                k, _, v = line.partition(b":")
                out.append((k.decode("latin-1"), v.strip().decode("latin-1")))
        return out

    def header(self, name: str) -> Optional[str]:
        for k, v in self.headers:
            if k.lower() == name.lower():
                return v
        return None

    @property
    def status(self) -> int:
        """As nginx reads it: the Status header, 200 when there is none."""
        value = self.header("Status")
        return int(value.split()[0]) if value else 200


# --------------------------------------------------------------------------
# Connection
# --------------------------------------------------------------------------

class FastCGIConnection:
    """One connection to a FastCGI server, every operation bounded by ``timeout``."""

    def __init__(self, address: Address, timeout: float = 10.0):
        family = socket.AF_UNIX if isinstance(address, str) else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(address)
        self.timeout = timeout
        self._buf = bytearray()

    def __enter__(self) -> "FastCGIConnection":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.sock.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def send_record(self, rtype: int, rid: int, content: bytes = b"", **kw) -> None:
        self.send(record(rtype, rid, content, **kw))

    def begin(self, rid: int = 1, keep: bool = False, role: int = RESPONDER) -> None:
        self.send_record(BEGIN_REQUEST, rid, struct.pack("!HB5x", role, KEEP_CONN if keep else 0))

    def send_params(self, rid: int, params: dict, split: int = 0) -> None:
        data = encode_pairs(params)
        step = split or 65535
        out = b"".join(record(PARAMS, rid, data[i:i + step]) for i in range(0, len(data), step))
        self.send(out + record(PARAMS, rid))

    def send_stdin(self, rid: int, body: bytes, chunk: int = 65535) -> None:
        out = b"".join(record(STDIN, rid, body[i:i + chunk]) for i in range(0, len(body), chunk))
        self.send(out + record(STDIN, rid))

    def start(self, uri: str, method: str = "GET", body: bytes = b"", rid: int = 1,
              keep: bool = False, extra: Optional[dict] = None, chunk: int = 65535) -> None:
        self.begin(rid, keep)
        self.send_params(rid, cgi_params(uri, method, body, extra))
        self.send_stdin(rid, body, chunk)

    def _fill(self, n: int, deadline: float) -> bool:
        """Buffer at least n bytes; False at EOF."""
        while len(self._buf) < n:
            self.sock.settimeout(max(0.001, deadline - time.monotonic()))
            chunk = self.sock.recv(max(65536, n - len(self._buf)))
            if not chunk:
                return False
            self._buf += chunk
        return True

    def read_record(self, timeout: Optional[float] = None) -> Optional[Record]:
        """The next record; None at EOF (or a reset).  Raises socket.timeout."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        try:
            if not self._fill(HEADER.size, deadline):
                return None
            _, rtype, rid, length, padding = HEADER.unpack_from(self._buf)
            if not self._fill(HEADER.size + length + padding, deadline):
                return None
        except ConnectionResetError:
            return None
        content = bytes(self._buf[HEADER.size:HEADER.size + length])
        del self._buf[:HEADER.size + length + padding]
        return Record(rtype, rid, content)

    def read_response(self, rid: int = 1, timeout: Optional[float] = None,
                      max_stdout: Optional[int] = None) -> Response:
        """Records until END_REQUEST for ``rid`` or EOF."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        resp = Response()
        out = []
        size = 0
        while True:
            try:
                rec = self.read_record(timeout=max(0.001, deadline - time.monotonic()))
            except ConnectionResetError:
                resp.eof = resp.reset = True
                break
            if rec is None:
                resp.eof = True
                break
            if rec.type == STDOUT and rec.request_id == rid:
                out.append(rec.content)
                size += len(rec.content)
                if max_stdout is not None and size >= max_stdout:
                    break
            elif rec.type == STDERR and rec.request_id == rid:
                resp.stderr += rec.content
            elif rec.type == END_REQUEST and rec.request_id == rid:
                resp.ended = True
                resp.app_status, resp.protocol_status = struct.unpack("!LB3x", rec.content)
                break
            else:
                resp.records.append(rec)
        resp.stdout = b"".join(out)
        return resp

    def request(self, uri: str, method: str = "GET", body: bytes = b"", rid: int = 1,
                keep: bool = False, extra: Optional[dict] = None, chunk: int = 65535,
                timeout: Optional[float] = None) -> Response:
        self.start(uri, method, body, rid, keep, extra, chunk)
        return self.read_response(rid, timeout=timeout)

    def get_values(self, names: list) -> dict:
        self.send_record(GET_VALUES, 0, encode_pairs({n: "" for n in names}))
        rec = self.read_record()
        if rec is None or rec.type != GET_VALUES_RESULT:
            raise AssertionError("expected GET_VALUES_RESULT, got %r" % (rec,))
        return decode_pairs(rec.content)

    def wait_closed(self, timeout: float) -> bool:
        """True once the server closed the connection (EOF or reset) within ``timeout``."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.sock.settimeout(max(0.001, deadline - time.monotonic()))
            try:
                if not self.sock.recv(65536):
                    return True
            except ConnectionResetError:
                return True
            except socket.timeout:
                return False
        return False


def request(address: Address, uri: str, timeout: float = 10.0, **kw) -> Response:
    """One request on a fresh connection."""
    with FastCGIConnection(address, timeout=timeout) as conn:
        return conn.request(uri, **kw)


# --------------------------------------------------------------------------
# Launching workers as supervisord does
# --------------------------------------------------------------------------

class Listener:
    """The shared listening socket supervisord would own."""

    def __init__(self, tmp_path, kind: str = "unix", backlog: int = 64):
        if kind == "unix":
            self.path = os.path.join(str(tmp_path), "fcgi-%d.sock" % next(_deploy_counter))
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.sock.bind(self.path)
            self.address: Address = self.path
        else:
            self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self.sock.bind(("127.0.0.1", 0))
            self.address = self.sock.getsockname()
        self.sock.listen(backlog)
        self.kind = kind

    def close(self) -> None:
        self.sock.close()


_deploy_counter = itertools.count()


def write_deploy(tmp_path, name: str = "conf", wsgi: str = "conformance:application",
                 directory: str = APPS, environment: Optional[dict] = None, **workers) -> str:
    """A deploy.toml for a test worker; ``workers`` are [workers] keys."""
    # A worker alone (no watchdog to promote it) serves at once unless a test
    # asks for warm_standby.
    settings = {"threads": 2, "idle_timeout": "5s", "graceful_timeout": "10s", "count": 1,
                "standby": 1, "warm_standby": False}
    settings.update(workers)
    lines = ["[app]", 'name = "%s"' % name, 'wsgi = "%s"' % wsgi,
             'directory = "%s"' % directory]
    if environment:
        lines.append("[app.environment]")
        lines += ['%s = "%s"' % kv for kv in environment.items()]
    lines.append("[workers]")
    for key, value in settings.items():
        if isinstance(value, bool):
            lines.append("%s = %s" % (key, "true" if value else "false"))
        elif isinstance(value, str):
            lines.append('%s = "%s"' % (key, value))
        else:
            lines.append("%s = %s" % (key, value))
    lines += ["[runtime]", 'dir = "%s"' % os.path.join(str(tmp_path), "rt")]
    path = os.path.join(str(tmp_path), "deploy-%s-%d.toml" % (name, next(_deploy_counter)))
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return path


_mark_counter = itertools.count()


class Marker:
    """A request that is known to be running in the app.

    ``uri(seconds)`` is a ``/sleep`` of the conformance app that first creates
    this marker's file; :meth:`wait` returns once the file exists, that is
    once the request has reached the application (ours or bare flup6 alike).
    """

    def __init__(self, tmp_path):
        self.path = os.path.join(str(tmp_path), "mark-%d" % next(_mark_counter))

    def uri(self, seconds: float) -> str:
        return "/sleep?s=%s&mark=%s" % (seconds, quote(self.path, safe=""))

    def wait(self, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while not os.path.exists(self.path):
            if time.monotonic() > deadline:
                raise AssertionError("the request did not reach the app within %.0fs" % timeout)
            time.sleep(0.02)


class WorkerProcess:
    """A worker subprocess with ``listener`` as its fd 0 and stderr to a log file."""

    def __init__(self, deploy: str, listener: Listener, slot: int = 0,
                 env: Optional[dict] = None, kind: Optional[str] = None):
        self.deploy = deploy
        self.listener = listener
        self.slot = slot
        self.kind = kind or server_kind()
        self.log_path = "%s.slot%d.%d.log" % (deploy, slot, int(time.monotonic() * 1000))
        if self.kind == "flup":
            cmd = [sys.executable, os.path.join(HERE, "flup_compare.py"), "serve", "-c", deploy]
        else:
            cmd = [sys.executable, "-m", "fcgi_toolkit", "worker", "-c", deploy, "--slot", str(slot)]
        full_env = dict(os.environ)
        full_env.update(env or {})
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(cmd, stdin=listener.sock.fileno(), stdout=subprocess.DEVNULL,
                                     stderr=self._log, env=full_env, close_fds=True)
        self.pid = self.proc.pid

    def log(self) -> str:
        with open(self.log_path, "rb") as f:
            return f.read().decode("utf-8", "replace")

    def wait_log(self, text: str, timeout: float = 10.0) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if text in self.log():
                return True
            time.sleep(0.05)
        return False

    def wait_ready(self, timeout: float = 15.0) -> None:
        """Until the worker accepts: its scoreboard slot says ready (ours) or it
        answers a request (bare flup has no scoreboard)."""
        deadline = time.monotonic() + timeout
        if self.kind == "flup":
            response = request(self.listener.address, "/hello", timeout=timeout)
            assert response.ended, "bare flup worker did not answer: %s" % self.log()
            return
        sys.path.insert(0, os.path.dirname(HERE))
        from fcgi_toolkit import settings
        from fcgi_toolkit.scoreboard import Scoreboard
        dep = settings.load(self.deploy)
        board = Scoreboard(dep.scoreboard_path, dep.slots)
        try:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise AssertionError("worker exited %s:\n%s" % (self.proc.returncode, self.log()))
                rec = board.read(self.slot)
                if rec is not None and rec.pid == self.pid and rec.ready:
                    return
                board.close()
                time.sleep(0.05)
        finally:
            board.close()
        raise AssertionError("worker not ready within %.0fs:\n%s" % (timeout, self.log()))

    def signal(self, sig: int) -> None:
        if self.proc.poll() is None:
            os.kill(self.pid, sig)

    def terminate(self) -> None:
        self.signal(signal.SIGTERM)

    def wait(self, timeout: float) -> Optional[int]:
        """The exit status, or None if still running after ``timeout``."""
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def stop(self) -> None:
        """Kill (if needed) and reap; always safe to call."""
        if self.proc.poll() is None:
            self.proc.kill()
        try:
            self.proc.wait(10)
        finally:
            self._log.close()


class Spawner:
    """Starts workers for a test and stops them (and closes their listeners) in :meth:`close`.

    ``spawn(kind="unix"|"tcp", listener=None, slot=0, env=None, ready=True,
    server=None, **workers_settings)``: ``server`` forces "ours" or "flup"
    (default: FCGI_TOOLKIT_SERVER).  Our worker is always waited for until
    its scoreboard says ready; bare flup6 has no scoreboard and is probed with
    a request, which ``ready=False`` skips (for a worker that refuses the
    test client, e.g. through FCGI_WEB_SERVER_ADDRS).  A warm standby
    (``warm_standby=True``) is not waited for: it accepts nothing until SIGUSR2.
    """

    def __init__(self, tmp_path):
        self.tmp_path = tmp_path
        self.workers: list = []
        self.listeners: list = []

    def spawn(self, kind: str = "unix", listener: Optional[Listener] = None, slot: int = 0,
              env: Optional[dict] = None, ready: bool = True, server: Optional[str] = None,
              **workers_settings) -> "WorkerProcess":
        if listener is None:
            listener = Listener(self.tmp_path, kind)
            self.listeners.append(listener)
        deploy = write_deploy(self.tmp_path, **workers_settings)
        w = WorkerProcess(deploy, listener, slot=slot, env=env, kind=server)
        self.workers.append(w)
        if (ready or w.kind != "flup") and not workers_settings.get("warm_standby"):
            w.wait_ready()
        return w

    def close(self) -> None:
        for w in self.workers:
            w.stop()
        for listener in self.listeners:
            listener.close()

