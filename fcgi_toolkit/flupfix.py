"""flup6 1.1.1's threaded FastCGI server, fixed for Python 3 by subclassing.

flup6 stays the dependency: the classes below subclass its ``Record``,
``InputStream``, ``OutputStream``, ``Request``, ``Connection`` and
``WSGIServer`` and replace the methods that are broken on Python 3 or
unsafe under supervisord.  Each override names the flup bug it fixes
(numbers as in the worker brief / issue #7); ``tests/flup_compare.py`` runs the
conformance cases against bare flup6 to show which still fail there.

We use the threaded server only: flup's ``fcgi_single`` cannot even be
constructed on Python 3 (bug 5).

Threading model: one thread per FastCGI connection, the request runs in
that thread, no multiplexing, and a connection is accepted only while a
thread is free (bug 9), so connections that a busy worker cannot serve stay
in the shared socket's backlog for any worker.  With ``threads > 1`` that is
flup's pool, the main thread only accepts.  With ``threads = 1`` (the
default) the main thread accepts and serves the connection itself: no thread
hand-off per connection; a small monitor thread notices the stop request and
enforces the drain deadline (see :class:`WSGIServer`).

Request path (issue #5): records are parsed in place from large reads; the
response is queued and goes out with FCGI_END_REQUEST in one send when the
body is a list or tuple (an iterator's parts are sent as they come); a
connection whose request was read to its end is closed at once, without the
lingering wait for the web server's FIN.
"""
from __future__ import annotations

import errno
import logging
import os
import re
import select
import signal
import socket
import struct
import sys
import threading
import time
import traceback
from typing import Any, Callable, Iterable, Optional, Protocol, Sequence

from flup.server import fcgi, fcgi_base
from flup.server.fcgi_base import (
    FCGI_ABORT_REQUEST, FCGI_BEGIN_REQUEST, FCGI_CANT_MPX_CONN, FCGI_DATA,
    FCGI_END_REQUEST, FCGI_GET_VALUES, FCGI_GET_VALUES_RESULT, FCGI_KEEP_CONN,
    FCGI_NULL_REQUEST_ID, FCGI_PARAMS, FCGI_REQUEST_COMPLETE,
    FCGI_STDIN, FCGI_STDOUT, FCGI_UNKNOWN_ROLE, FCGI_UNKNOWN_TYPE,
    FCGI_VERSION_1,
)

log = logging.getLogger("fcgi_toolkit.worker")

HEADER = struct.Struct("!BBHHBx")
BEGIN_BODY = struct.Struct("!HB5x")
END_BODY = struct.Struct("!LB3x")
UNKNOWN_BODY = struct.Struct("!B7x")
HEADER_LEN = HEADER.size
_LENGTH = struct.Struct("!L")
_PADDING = tuple(b"\0" * n for n in range(8))

# Largest record content that needs no padding (FastCGI lengths are 16 bit).
MAX_CONTENT = 65528
# How long a closing connection waits for the peer's FIN before closing hard.
LINGER = 1.0
# While draining, a connection with no request in the application is given
# this long between bytes (instead of idle_timeout), so it cannot hold the
# worker until its hard deadline.
DRAIN_READ_GRACE = 1.0
# Most bytes of PARAMS one request may send (nginx sends a few KB).
MAX_PARAMS = 1024 * 1024
# Queued output is sent once it reaches FLUSH_BYTES; up to JOIN_BYTES it is
# joined into one buffer for the send, beyond that gathered by sendmsg.
FLUSH_BYTES = 256 * 1024
JOIN_BYTES = 64 * 1024
IOV_MAX = 512

_PEER_GONE = (errno.EPIPE, errno.ECONNRESET, errno.ENOTCONN, errno.EBADF, errno.ESHUTDOWN)
_TOKEN = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")
_STATUS = re.compile(r"^[1-9][0-9]{2} ")
_NO_BODY_STATUS = ("204", "304")
# Header names that passed the checks (apps send the same few again and
# again): a set lookup instead of a regular expression, bounded.
_GOOD_NAMES: set = set()


class ProtocolError(Exception):
    """Malformed input from the web server: close this connection only."""


class ResponseCut(Exception):
    """The response cannot be finished: close the connection without END_REQUEST."""


class RequestObserver(Protocol):
    """What the server reports per request (the scoreboard's SlotWriter fits)."""

    def begin(self, method: str, uri: str) -> int: ...

    def end(self, token: int) -> None: ...


# --------------------------------------------------------------------------
# Pure helpers
# --------------------------------------------------------------------------

def parse_web_server_addrs(value: Optional[str]) -> Optional[frozenset]:
    """FCGI_WEB_SERVER_ADDRS as a set (None: any peer).  flup keeps a ``map``
    iterator here, which is exhausted by the first check (bug 6)."""
    if value is None:
        return None
    return frozenset(a.strip() for a in value.split(",") if a.strip())


def client_allowed(family: int, addr: Any, allowed: Optional[frozenset]) -> bool:
    """Whether a peer may talk to us.  The list names IP addresses, so it
    applies to TCP only; on a unix socket the peer has no address (flup
    rejected every unix peer here, bug 6)."""
    if allowed is None or family not in (socket.AF_INET, socket.AF_INET6):
        return True
    host = addr[0] if isinstance(addr, tuple) and addr else ""
    if host.startswith("::ffff:") and host[7:] in allowed:
        return True
    return host in allowed


def _pair_length(data: bytes, pos: int, end: int) -> tuple[int, int]:
    """One name or value length of a FastCGI pair at ``pos`` (1 byte, or 4
    with the high bit set); returns (length, position after it)."""
    if pos >= end:
        raise ProtocolError("truncated name-value pair")
    if data[pos] & 0x80:
        if pos + 4 > end:
            raise ProtocolError("truncated name-value length")
        return _LENGTH.unpack_from(data, pos)[0] & 0x7FFFFFFF, pos + 4
    return data[pos], pos + 1


def decode_params(data: bytes) -> dict:
    """FastCGI name-value pairs as a ``str -> str`` dict (latin-1, as CGI
    values are bytes); raises ProtocolError on a truncated pair (flup's
    ``decode_pair`` silently returns short names and values).  The whole
    block is decoded once: latin-1 maps byte offsets to the same character
    offsets, so names and values are plain slices of one string."""
    text = data.decode("latin-1")
    out = {}
    pos, end = 0, len(data)
    while pos < end:
        nlen = data[pos]
        if nlen < 128 and pos + 1 < end:
            vlen = data[pos + 1]
            if vlen < 128:   # both lengths in one byte: nearly every CGI pair
                mid = pos + 2 + nlen
                stop = mid + vlen
                if stop > end:
                    raise ProtocolError("name-value pair longer than its record")
                out[text[pos + 2:mid]] = text[mid:stop]
                pos = stop
                continue
        nlen, pos = _pair_length(data, pos, end)
        vlen, pos = _pair_length(data, pos, end)
        mid = pos + nlen
        stop = mid + vlen
        if stop > end:
            raise ProtocolError("name-value pair longer than its record")
        out[text[pos:mid]] = text[mid:stop]
        pos = stop
    return out


def decode_pairs(data: bytes) -> list:
    """FastCGI name-value pairs as (name, value) bytes, in order (see
    :func:`decode_params` for the errors)."""
    pairs = []
    pos, end = 0, len(data)
    while pos < end:
        nlen, pos = _pair_length(data, pos, end)
        vlen, pos = _pair_length(data, pos, end)
        if pos + nlen + vlen > end:
            raise ProtocolError("name-value pair longer than its record")
        pairs.append((bytes(data[pos:pos + nlen]), bytes(data[pos + nlen:pos + nlen + vlen])))
        pos += nlen + vlen
    return pairs


def encode_pair(name: bytes, value: bytes) -> bytes:
    out = bytearray()
    for length in (len(name), len(value)):
        out += bytes([length]) if length < 128 else struct.pack("!L", length | 0x80000000)
    return bytes(out) + name + value


def encode_record(rtype: int, request_id: int, content: Any = b"") -> bytes:
    """One record, padded to a multiple of 8; ``content`` may be a memoryview."""
    length = len(content)
    padding = -length & 7
    return b"".join((HEADER.pack(FCGI_VERSION_1, rtype, request_id, length, padding),
                     content, b"\0" * padding))


def response_head(status: str, headers: Sequence[tuple]) -> bytes:
    """The CGI response head; raises ValueError for a value that is not latin-1
    (flup encoded with ``ascii`` after the request had started, bug 1)."""
    lines = ["Status: %s\r\n" % status]
    lines += ["%s: %s\r\n" % (k, v) for k, v in headers]
    lines.append("\r\n")
    try:
        return "".join(lines).encode("latin-1")
    except UnicodeEncodeError as exc:
        raise ValueError("response header is not latin-1: %s" % exc) from None


def check_response_start(status: Any, headers: Any) -> None:
    """PEP 3333 checks of start_response's arguments; ValueError/TypeError names the fault."""
    if not isinstance(status, str):
        raise TypeError("status must be str, got %s" % type(status).__name__)
    if not _STATUS.match(status) or "\r" in status or "\n" in status:
        raise ValueError("status must look like '200 OK', got %r" % status)
    if not isinstance(headers, list):
        raise TypeError("response headers must be a list, got %s" % type(headers).__name__)
    for item in headers:
        if not (isinstance(item, tuple) and len(item) == 2):
            raise TypeError("response header must be a (name, value) tuple, got %r" % (item,))
        name, value = item
        if not isinstance(name, str) or not isinstance(value, str):
            raise TypeError("response header %r: name and value must be str" % (item,))
        if name not in _GOOD_NAMES:
            if not _TOKEN.match(name) or name.lower() == "status":
                raise ValueError("response header name %r is not allowed" % name)
            if len(_GOOD_NAMES) < 256:
                _GOOD_NAMES.add(name)
        if "\r" in value or "\n" in value:
            raise ValueError("response header %s contains a line break" % name)
        if not value.isascii():
            try:
                value.encode("latin-1")
            except UnicodeEncodeError:
                raise ValueError("response header %s value %r is not latin-1" % (name, value)) from None


def error_page(debug: bool, tb_text: str) -> bytes:
    """The 500 response, with a Status line (flup sent none, bug 2); the
    traceback only when ``debug`` (flup's default sent cgitb pages, bug 3)."""
    body = "Internal Server Error\n"
    if debug:
        body += "\n" + tb_text
    data = body.encode("utf-8", "replace")
    return (b"Status: 500 Internal Server Error\r\n"
            b"Content-Type: text/plain; charset=utf-8\r\n"
            b"Content-Length: " + str(len(data)).encode() + b"\r\n\r\n" + data)


def status_has_body(method: str, status: str) -> bool:
    return not (method == "HEAD" or status[:3] in _NO_BODY_STATUS or status[:1] == "1")


def describe_inflight(requests: Iterable[tuple], now: float) -> str:
    """``GET /x (12.3s), ...`` for a log line naming cut requests."""
    items = sorted(requests, key=lambda r: r[2])
    return ", ".join("%s %s (%.1fs)" % (m, u, now - s) for m, u, s in items) or "none"


# --------------------------------------------------------------------------
# Streams
# --------------------------------------------------------------------------

class ErrorStream:
    """``wsgi.errors``: takes str and bytes, writes to the worker log (stderr).
    flup sent it to FCGI_STDERR through a bytes stream, so text raised
    TypeError and hung the request (bug 1)."""

    def __init__(self, stream=None):
        self._stream = stream
        self._lock = threading.Lock()

    def write(self, data: Any) -> int:
        if isinstance(data, (bytes, bytearray, memoryview)):
            text = bytes(data).decode("utf-8", "replace")
        else:
            text = str(data)
        stream = self._stream or sys.stderr
        with self._lock:
            stream.write(text)
            stream.flush()
        return len(data)

    def writelines(self, lines: Iterable[Any]) -> None:
        for line in lines:
            self.write(line)

    def flush(self) -> None:
        (self._stream or sys.stderr).flush()


class InputStream(fcgi_base.InputStream):
    """``wsgi.input``.  A bytearray buffer: flup's readline re-joins its whole
    buffer on every record, which is quadratic for long lines."""

    def __init__(self, conn):
        # Not flup's __init__: its buffer fields are unused here.
        self._conn = conn
        self._eof = False
        self._data = bytearray()
        self._rpos = 0
        self._scan = 0   # no newline in _data[_rpos:_scan]

    def add_data(self, data: bytes) -> None:
        if not data:
            self._eof = True
        else:
            self._data += data

    def _waitForData(self) -> None:
        try:
            self._conn.process_input()
        except (EOFError, ProtocolError, OSError) as exc:
            # The web server went away while the app reads the body: the app
            # sees the end of the body, the response will fail to send.
            self._conn.mark_broken("while reading the request body: %s" % (exc or type(exc).__name__))
            self._eof = True

    def _compact(self) -> None:
        if self._rpos > 65536 and self._rpos * 2 > len(self._data):
            del self._data[:self._rpos]
            self._scan -= self._rpos
            self._rpos = 0

    def _take(self, n: int) -> bytes:
        out = bytes(self._data[self._rpos:self._rpos + n])
        self._rpos += len(out)
        self._scan = max(self._scan, self._rpos)
        self._compact()
        return out

    def _available(self) -> int:
        return len(self._data) - self._rpos

    def read(self, n: Optional[int] = -1) -> bytes:
        if n is None or n < 0:
            while not self._eof:
                self._waitForData()
            return self._take(self._available())
        while self._available() < n and not self._eof:
            self._waitForData()
        return self._take(min(n, self._available()))

    def readline(self, size: Optional[int] = -1) -> bytes:
        limit = None if size is None or size < 0 else size
        while True:
            i = self._data.find(b"\n", self._scan)
            if i >= 0:
                n = i + 1 - self._rpos
                return self._take(n if limit is None else min(n, limit))
            self._scan = len(self._data)
            if limit is not None and self._available() >= limit:
                return self._take(limit)
            if self._eof:
                return self._take(self._available())
            self._waitForData()

    def readlines(self, hint: int = -1) -> list:
        lines, total = [], 0
        while True:
            line = self.readline()
            if not line:
                return lines
            lines.append(line)
            total += len(line)
            if 0 < hint <= total:
                return lines


class OutputStream(fcgi_base.OutputStream):
    """FCGI_STDOUT.  flup sliced ``data = data[toWrite:]`` per 8 KB record,
    so one large write was quadratic (bug 7): we slice a memoryview into
    64 KB records.  Records are queued on the connection
    (:meth:`Connection.queue_record`), which sends what is queued in one
    system call when the handler flushes or the request ends."""

    def _write(self, data: Any) -> None:
        queue = self._conn.queue_record
        rtype, rid = self._type, self._req.requestId
        if type(data) is bytes and len(data) <= MAX_CONTENT:
            queue(rtype, rid, data)
            return
        view = memoryview(data).cast("B")
        for off in range(0, len(view), MAX_CONTENT):
            queue(rtype, rid, view[off:off + MAX_CONTENT])

    def close(self) -> None:
        """Queue the end of the stream, if anything was written (flup's rule)."""
        if not self.closed and self.dataWritten:
            self.flush()   # flup's buffered mode
            self._conn.queue_record(self._type, self._req.requestId)
            self.closed = True


# --------------------------------------------------------------------------
# Request and connection
# --------------------------------------------------------------------------

class Request(fcgi_base.Request):
    """One FastCGI request.  flup's ``run`` printed the traceback as str into
    a bytes stream, so the TypeError escaped and the request never ended
    (bug 1); here the handler never raises for an app error, and a response
    that cannot be finished closes the connection."""

    def __init__(self, conn, inputStreamClass):
        self._conn = conn
        self.server = conn.server
        self.params: dict = {}
        self.raw_params = bytearray()
        self.stdin = inputStreamClass(conn)
        self.stdout = OutputStream(conn, self, FCGI_STDOUT)
        self._data = None
        self.aborted = False
        self.started = False

    @property
    def data(self) -> InputStream:
        """FCGI_DATA (filter role only, which we refuse): made on first use."""
        if self._data is None:
            self._data = self._conn._inputStreamClass(self._conn)
        return self._data

    def run(self) -> None:
        conn = self._conn
        try:
            protocol_status, app_status = self.server.handler(self)
            self.stdout.close()
            conn.end_request(self, app_status, protocol_status)
        except ResponseCut as exc:
            log.warning("response cut, closing the connection: %s", exc)
            conn.close(linger=True)
        except OSError as exc:
            log.info("web server went away before the end of the response: %s", exc)
            conn.close(linger=False)


class Connection(fcgi_base.Connection):
    """One FastCGI connection, served by one thread (a pool thread, or the
    main thread when the server runs inline)."""

    _multiplexed = False
    _inputStreamClass = InputStream

    def __init__(self, sock: socket.socket, addr: Any, server: "WSGIServer"):
        super().__init__(sock, addr, server)
        self.closed = False
        self.broken: Optional[str] = None
        self.current: Optional[tuple] = None   # (method, uri, start) while in the app
        self._rbuf = bytearray()   # received, not yet parsed from _rpos on
        self._rpos = 0
        self._wbuf: list = []      # records queued for one send
        self._wlen = 0
        self._send_lock = threading.Lock()

    # -- entry point (flup's ThreadPool, or the inline accept loop) ----------
    def run(self) -> None:
        server = self.server
        try:
            self._serve()
        except BaseException:  # a bug of ours: log it, never kill the serving thread silently
            log.exception("connection thread failed")
        finally:
            self.close(linger=False)
            server.connection_done(self)

    def _serve(self) -> None:
        peer = self.peer()
        try:
            while not self.closed:
                if not self._wait_for_record():
                    return
                self.process_record()
                if self.server.draining and not self._requests and not self.closed:
                    # Between requests while draining: close now (nginx
                    # retries a request that fails on a cached connection).
                    self.close(linger=True)
        except EOFError:
            pass
        except ProtocolError as exc:
            log.warning("closing FastCGI connection from %s: %s", peer, exc)
        except socket.timeout:
            log.info("closing FastCGI connection from %s: silent for %.1fs",
                     peer, self._read_timeout() or 0.0)
        except OSError as exc:
            if exc.errno not in _PEER_GONE:
                log.warning("FastCGI connection from %s failed: %s", peer, exc)

    def peer(self) -> str:
        if isinstance(self._addr, tuple) and self._addr:
            return "%s:%s" % self._addr[:2]
        return "unix socket"

    # -- reading -------------------------------------------------------------
    def _read_timeout(self) -> Optional[float]:
        timeout = self.server.idle_timeout or None   # 0: no timeout
        if self.server.draining and self.current is None:
            timeout = min(timeout or DRAIN_READ_GRACE, DRAIN_READ_GRACE)
        return timeout

    def _wait_for_record(self) -> bool:
        """Wait for the next record.  False: close quietly (draining while idle)."""
        if self._rpos < len(self._rbuf):
            return True
        if not self._requests and self.server.draining:
            r, _, _ = select.select([self._sock], [], [], 0)
            return bool(r)
        # Mostly the next record is here already (a new connection's request,
        # the rest of this one): try to read before waiting.
        if self._recv_more():
            return True
        return self._wait_readable(idle=not self._requests)

    def _wait_readable(self, idle: bool = False) -> bool:
        """Wait until the socket is readable; raise socket.timeout after the
        read timeout.  Until draining starts, a connection with no request in
        the application also watches the drain pipe, so that the drain
        shortens its timeout at once.  Returns False if ``idle`` and draining
        started while waiting."""
        server = self.server
        while True:
            watch = [self._sock]
            if not server.draining and self.current is None:
                watch.append(server.drain_fd)
            r, _, _ = select.select(watch, [], [], self._read_timeout())
            if self._sock in r:
                return True
            if not r:
                raise socket.timeout()
            if idle:
                r, _, _ = select.select([self._sock], [], [], 0)
                return bool(r)
            # draining started mid-record: wait again with the drain's timeout

    def _recv_more(self) -> bool:
        """One read of what has arrived, without waiting: True if it brought
        data, False if there was none; EOFError when the peer closed."""
        buf = self._rbuf
        try:
            chunk = self._sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return False
        if not chunk:
            if len(buf) > self._rpos:
                raise ProtocolError("connection closed mid-record")
            raise EOFError()
        if self._rpos == len(buf):
            buf.clear()
            self._rpos = 0
        buf += chunk
        return True

    def _fill(self, need: int) -> None:
        """Read until ``need`` unparsed bytes are buffered, with large recv
        calls (one usually brings a whole request's records)."""
        buf = self._rbuf
        if self._rpos:
            del buf[:self._rpos]
            self._rpos = 0
        while len(buf) < need:
            try:
                chunk = self._sock.recv(max(65536, need - len(buf)))
            except (BlockingIOError, InterruptedError):
                self._wait_readable()
                continue
            if not chunk:
                if buf:
                    raise ProtocolError("connection closed mid-record")
                raise EOFError()
            buf += chunk

    def next_record(self) -> tuple:
        """(type, request id, content bytes) of the next record, parsed in the
        read buffer.  Unlike flup, formats no debug strings (bug 10) and never
        blocks longer than the read timeout per byte (bug 12)."""
        buf = self._rbuf
        if len(buf) - self._rpos < HEADER_LEN:
            self._fill(HEADER_LEN)
        pos = self._rpos
        version, rtype, rid, length, padding = HEADER.unpack_from(buf, pos)
        if version != FCGI_VERSION_1:
            raise ProtocolError("bad record version %d" % version)
        end = pos + HEADER_LEN + length
        if len(buf) < end + padding:
            try:
                self._fill(HEADER_LEN + length + padding)
            except EOFError:
                raise ProtocolError("connection closed mid-record") from None
            pos, end = 0, HEADER_LEN + length   # _fill moved the unparsed bytes to the front
        content = bytes(buf[pos + HEADER_LEN:end]) if length else b""
        self._rpos = end + padding
        return rtype, rid, content

    def process_input(self) -> None:
        """Read and handle one record (flup's name: InputStream calls it)."""
        self.process_record()

    def process_record(self) -> None:
        rtype, rid, content = self.next_record()
        if rid == FCGI_NULL_REQUEST_ID:
            if rtype == FCGI_GET_VALUES:
                self._do_get_values(content)
            else:
                self._do_unknown_type(rtype)
        elif rtype == FCGI_PARAMS:
            self._do_params(rid, content)
        elif rtype == FCGI_STDIN:
            self._do_stdin(rid, content)
        elif rtype == FCGI_BEGIN_REQUEST:
            self._do_begin_request(rid, content)
        elif rtype == FCGI_ABORT_REQUEST:
            self._do_abort_request(rid)
        elif rtype == FCGI_DATA:
            self._do_data(rid, content)
        # else: a request record of a type an application never receives; ignore.

    def poll_input(self, req: Request) -> None:
        """While a response is being sent: handle records that arrived (an
        FCGI_ABORT_REQUEST, the peer closing).  flup looked at the socket
        only when the app read its body, so an abort was never seen."""
        if self.broken:
            raise ResponseCut(self.broken)
        while not req.aborted:
            if self._rpos >= len(self._rbuf):
                r, _, _ = select.select([self._sock], [], [], 0)
                if not r:
                    return
            try:
                self.process_record()
            except EOFError:
                raise ResponseCut("web server closed the connection") from None
            except (ProtocolError, socket.timeout) as exc:
                raise ResponseCut("bad input during the response: %s" % (exc or "timeout")) from None

    def mark_broken(self, why: str) -> None:
        self.broken = why

    def _peer_done(self, req: Request) -> bool:
        """Whether the web server has sent all it will send for ``req`` (the
        empty FCGI_STDIN record arrived) and nothing waits unread in the
        kernel.  Then closing sends a FIN, not a reset, and there is nothing
        to linger for."""
        if req.aborted:
            return False
        if not req.stdin._eof:
            buf, pos, end = self._rbuf, self._rpos, len(self._rbuf)
            while True:
                if end - pos < HEADER_LEN:
                    return False
                _, rtype, rid, length, padding = HEADER.unpack_from(buf, pos)
                if rtype == FCGI_STDIN and rid == req.requestId and not length:
                    break
                pos += HEADER_LEN + length + padding
        try:
            r, _, _ = select.select([self._sock], [], [], 0)
            # Readable: data (linger), or only the peer's FIN (nothing unread).
            return not r or not self._sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        except (OSError, ValueError):
            return False

    # -- record handlers -----------------------------------------------------
    def _do_begin_request(self, rid: int, content: bytes) -> None:
        if len(content) != BEGIN_BODY.size:
            raise ProtocolError("BEGIN_REQUEST body of %d bytes" % len(content))
        role, flags = BEGIN_BODY.unpack(content)
        req = self.server.request_class(self, self._inputStreamClass)
        req.requestId, req.role, req.flags = rid, role, flags
        if self._requests:
            self.end_request(req, 0, FCGI_CANT_MPX_CONN, remove=False)
        elif role not in self.server.roles:
            self.end_request(req, 0, FCGI_UNKNOWN_ROLE, remove=False)
        else:
            self._requests[rid] = req

    def _do_abort_request(self, rid: int) -> None:
        req = self._requests.get(rid)
        if req is None:
            return
        req.aborted = True
        req.stdin.add_data(b"")
        if self.current is None:
            # Not started yet: end it now.
            self.end_request(req, 0, FCGI_REQUEST_COMPLETE)

    def _do_params(self, rid: int, content: bytes) -> None:
        req = self._requests.get(rid)
        if req is None:
            return
        if content:
            req.raw_params += content
            if len(req.raw_params) > MAX_PARAMS:
                raise ProtocolError("more than %d bytes of PARAMS" % MAX_PARAMS)
            return
        # Pairs may span records: decode once, at the end of the stream
        # (flup decoded each record on its own).
        if req.started:
            return   # a second end of PARAMS: ignore
        req.started = True
        req.params = decode_params(req.raw_params)
        req.raw_params = bytearray()
        self._start_request(req)

    def _do_stdin(self, rid: int, content: bytes) -> None:
        req = self._requests.get(rid)
        if req is not None:
            req.stdin.add_data(content)

    def _do_data(self, rid: int, content: bytes) -> None:
        req = self._requests.get(rid)
        if req is not None:
            req.data.add_data(content)

    def _start_request(self, req: Request) -> None:
        params = req.params
        self.current = (params.get("REQUEST_METHOD", ""), params.get("REQUEST_URI", ""), time.time())
        try:
            req.run()
        finally:
            self.current = None

    def _do_get_values(self, content: bytes) -> None:
        """flup mixed str and bytes here (bug 11)."""
        out = bytearray()
        for name, _ in decode_pairs(content):
            value = self.server.capability.get(name.decode("latin-1"))
            if value is not None:
                out += encode_pair(name, str(value).encode("ascii"))
        self.send_record(FCGI_GET_VALUES_RESULT, FCGI_NULL_REQUEST_ID, bytes(out))

    def _do_unknown_type(self, rtype: int) -> None:
        """flup referenced an undefined ``rec`` here (NameError, bug 11)."""
        self.send_record(FCGI_UNKNOWN_TYPE, FCGI_NULL_REQUEST_ID, UNKNOWN_BODY.pack(rtype))

    # -- writing -------------------------------------------------------------
    def queue_record(self, rtype: int, request_id: int, content: Any = b"") -> None:
        """Queue one record (``content`` bytes-like, at most 65535 bytes) for
        the next :meth:`flush`; flushes by itself past FLUSH_BYTES."""
        if self.closed:
            raise OSError(errno.EBADF, "connection closed")
        length = len(content)
        padding = -length & 7
        out = self._wbuf
        out.append(HEADER.pack(FCGI_VERSION_1, rtype, request_id, length, padding))
        if length:
            out.append(content)
        if padding:
            out.append(_PADDING[padding])
        self._wlen += HEADER_LEN + length + padding
        if self._wlen >= FLUSH_BYTES:
            self.flush()

    def flush(self) -> None:
        """Send every queued record, in one system call when it can."""
        if not self._wbuf:
            return
        parts, size = self._wbuf, self._wlen
        self._wbuf, self._wlen = [], 0   # gone even if the send fails: never sent twice
        with self._send_lock:
            if size <= JOIN_BYTES:
                self._sendall(b"".join(parts))
            else:
                self._sendv(parts)

    def send_record(self, rtype: int, request_id: int, content: Any = b"") -> None:
        """Send one record now (after anything queued)."""
        self.queue_record(rtype, request_id, content)
        self.flush()

    def _wait_writable(self) -> None:
        _, w, _ = select.select([], [self._sock], [], self.server.idle_timeout or None)
        if not w:
            raise socket.timeout("send timed out")

    def _sendall(self, data: bytes) -> None:
        """Send everything; the socket is non-blocking, so wait for room with
        select and give up after the idle timeout without progress."""
        view = memoryview(data)
        sock = self._sock
        while view:
            try:
                sent = sock.send(view)
            except (BlockingIOError, InterruptedError):
                self._wait_writable()
                continue
            view = view[sent:]

    def _sendv(self, parts: list) -> None:
        """Like :meth:`_sendall` for a list of buffers, without joining them
        (sendmsg gathers them), at most IOV_MAX at a time."""
        sock = self._sock
        parts = [memoryview(p).cast("B") for p in parts]
        while parts:
            try:
                sent = sock.sendmsg(parts[:IOV_MAX])
            except (BlockingIOError, InterruptedError):
                self._wait_writable()
                continue
            i = 0
            while i < len(parts) and sent >= len(parts[i]):
                sent -= len(parts[i])
                i += 1
            del parts[:i]
            if sent:
                parts[0] = parts[0][sent:]

    def writeRecord(self, rec) -> None:  # flup's API, kept for its callers
        self.send_record(rec.type, rec.requestId, rec.contentData)

    def end_request(self, req, appStatus: int = 0, protocolStatus: int = FCGI_REQUEST_COMPLETE,
                    remove: bool = True) -> None:
        """Send END_REQUEST together with whatever the response queued; close
        the connection unless the web server asked to keep it."""
        self.queue_record(FCGI_END_REQUEST, req.requestId, END_BODY.pack(appStatus, protocolStatus))
        self.flush()
        if remove:
            self._requests.pop(req.requestId, None)
        if not (req.flags & FCGI_KEEP_CONN) and not self._requests:
            self.close(linger=not self._peer_done(req))

    def close(self, linger: bool = False) -> None:
        """Close the connection (after sending what is still queued, if it
        can).  With ``linger``, send our FIN first and read until the peer's
        (bounded: flup waited for it forever), so unread input does not turn
        our last records into a reset."""
        if self.closed:
            return
        if self._wbuf:
            try:
                self.flush()
            except OSError:
                pass
        self.closed = True
        sock = self._sock
        try:
            if linger:
                sock.shutdown(socket.SHUT_WR)
                deadline = time.monotonic() + LINGER
                while True:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        break
                    r, _, _ = select.select([sock], [], [], remaining)
                    if not r or not sock.recv(65536):
                        break
        except OSError:
            pass
        finally:
            sock.close()

    def _cleanupSocket(self) -> None:  # flup's name
        self.close(linger=True)


# --------------------------------------------------------------------------
# Server
# --------------------------------------------------------------------------

_NOTHING_PENDING = object()   # _accept: no connection waiting

# Signals a helper thread must never take from the main thread (there the
# Python-level handlers run and interrupt the main thread's waits).
_SYNCHRONOUS_SIGNALS = frozenset({signal.SIGSEGV, signal.SIGBUS, signal.SIGFPE, signal.SIGILL,
                                  signal.SIGABRT, signal.SIGTRAP, signal.SIGSYS})


def exit_past_deadline() -> None:
    """What an inline server does past its drain deadline when given no
    ``on_deadline``: the stuck request holds the only serving thread, so the
    process exits with status 1 without waiting for it."""
    for handler in logging.getLogger().handlers:
        try:
            handler.flush()
        except (OSError, ValueError):
            pass
    try:
        sys.stderr.flush()
    except (OSError, ValueError):
        pass
    os._exit(1)


class WSGIServer(fcgi.WSGIServer):
    """flup6's threaded WSGIServer with the fixes above.

    ``serve(listening_socket)`` runs the accept loop until :meth:`request_stop`
    (called from a signal handler: it only sets a flag), then drains: stops
    accepting, lets in-flight requests finish, closes idle connections.  It
    returns 0 when drained, 1 when ``graceful_timeout`` passed first (the log
    line names the requests cut).  It installs no signal handlers itself.

    With ``threads=1`` the server runs *inline*: the thread calling
    :meth:`serve` accepts a connection and serves it itself, with no pool
    thread and no hand-off per connection.  A small monitor thread then holds
    the wake-up pipe: it notices the stop request, starts the drain, and at the
    drain deadline calls ``on_deadline`` (default: :func:`exit_past_deadline`),
    since the stuck request holds the only serving thread.  With more threads,
    flup's pool serves the connections and the calling thread only accepts.
    """

    request_class = Request

    def __init__(self, application: Callable, *, threads: int = 1, idle_timeout: float = 60.0,
                 graceful_timeout: float = 30.0, debug: bool = False,
                 observer: Optional[RequestObserver] = None,
                 web_server_addrs: Optional[str] = None,
                 errors: Optional[ErrorStream] = None,
                 environ: Optional[dict] = None):
        # flup's debug=True default sends cgitb pages with locals (bug 3).
        # Inline (one thread): flup's pool gets no thread at all, so no idle
        # thread can take the process's signals from the main thread.
        pool = 0 if threads == 1 else threads
        fcgi.WSGIServer.__init__(self, application, environ=environ,
                                 multithreaded=threads > 1, multiprocess=True,
                                 debug=debug, minSpare=pool, maxSpare=pool,
                                 maxThreads=threads)
        self._connectionClass = Connection
        self.threads = threads
        self.inline = threads == 1
        self.idle_timeout = idle_timeout
        self.graceful_timeout = graceful_timeout
        self.observer = observer
        self.errors = errors or ErrorStream()
        self.capability = {"FCGI_MAX_CONNS": threads, "FCGI_MAX_REQS": threads,
                           "FCGI_MPXS_CONNS": 0}
        self._allowed = parse_web_server_addrs(web_server_addrs)
        self._lock = threading.Lock()
        self._connections: set = set()
        self.stop_requested = False
        self.draining = False
        self._deadline = 0.0
        self._drain_lock = threading.Lock()
        self._finished = threading.Event()
        self._on_drain: Optional[Callable[[], None]] = None
        self._on_deadline: Optional[Callable[[], None]] = None
        # What every environ gets (PEP 3333); copied into it per request.
        self._wsgi_keys = {"wsgi.version": (1, 0), "wsgi.errors": self.errors,
                           "wsgi.multithread": self.multithreaded, "wsgi.multiprocess": True,
                           "wsgi.run_once": False}
        self._wake_r, self._wake_w = os.pipe()
        self._drain_r, self._drain_w = os.pipe()
        for fd in (self._wake_r, self._wake_w, self._drain_r, self._drain_w):
            os.set_blocking(fd, False)
            os.set_inheritable(fd, False)

    # -- control -----------------------------------------------------------
    @property
    def wake_fd(self) -> int:
        """Write end of the wake-up pipe (for signal.set_wakeup_fd)."""
        return self._wake_w

    @property
    def drain_fd(self) -> int:
        """Readable once draining started (idle connections watch it)."""
        return self._drain_r

    def request_stop(self) -> None:
        """Ask for a drain.  Only sets a flag: safe in a signal handler."""
        self.stop_requested = True

    def wake(self) -> None:
        try:
            os.write(self._wake_w, b"\0")
        except BlockingIOError:
            pass  # already awake

    def connections(self) -> list:
        with self._lock:
            return list(self._connections)

    def connection_done(self, conn: Connection) -> None:
        with self._lock:
            was_full = len(self._connections) >= self.threads
            self._connections.discard(conn)
        if not self.inline and (was_full or self.draining):
            self.wake()   # the main loop waits for a free thread, or drains

    def _busy(self) -> int:
        with self._lock:
            return len(self._connections)

    def _drain_wake_pipe(self) -> None:
        try:
            while os.read(self._wake_r, 4096):
                pass
        except BlockingIOError:
            pass

    # -- accept loop ---------------------------------------------------------
    def serve(self, listener: socket.socket, on_ready: Optional[Callable[[], None]] = None,
              on_drain: Optional[Callable[[], None]] = None,
              on_deadline: Optional[Callable[[], None]] = None) -> int:
        """Accept until :meth:`request_stop`, then drain; ``on_ready`` runs just
        before the first accept, ``on_drain`` when draining starts,
        ``on_deadline`` (inline only, in the monitor thread) when the drain
        deadline passes with a request still running."""
        listener.setblocking(False)
        self._on_drain, self._on_deadline = on_drain, on_deadline
        monitor = None
        if self.inline:
            monitor = threading.Thread(target=self._monitor, name="fcgi-drain-monitor", daemon=True)
            monitor.start()
        try:
            if on_ready is not None:
                on_ready()
            if self.inline:
                self._accept_inline(listener)
            else:
                self._accept_to_pool(listener)
            return self._drain()
        finally:
            self._finished.set()
            if monitor is not None:
                self.wake()
                monitor.join(5.0)

    def _accept_inline(self, listener: socket.socket) -> None:
        family = listener.family
        watch = [self._drain_r, listener]
        while not (self.stop_requested or self.draining):
            conn = self._accept(listener, family)
            if conn is _NOTHING_PENDING:
                # The drain pipe is never read: once readable, draining is set.
                select.select(watch, [], [], 1.0)
            elif conn is not None:
                conn.run()

    def _accept_to_pool(self, listener: socket.socket) -> None:
        family = listener.family
        while not self.stop_requested:
            if self._busy() < self.threads:
                conn = self._accept(listener, family)
                if conn is not _NOTHING_PENDING:
                    if conn is not None:
                        # A thread is free (checked before accepting), so this never queues.
                        self._threadPool.addJob(conn, allowQueuing=True)
                    continue
                watch = [self._wake_r, listener]
            else:
                watch = [self._wake_r]
            r, _, _ = select.select(watch, [], [], 1.0)
            if self._wake_r in r:
                self._drain_wake_pipe()

    def _accept(self, listener: socket.socket, family: int) -> Any:
        """One accepted connection, None if one was taken and refused, or
        _NOTHING_PENDING."""
        try:
            sock, addr = listener.accept()
        except (BlockingIOError, InterruptedError):
            return _NOTHING_PENDING   # none, or another worker took it
        except OSError as exc:
            if exc.errno in (errno.ECONNABORTED, errno.EPROTO):
                return None
            if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                log.error("accept failed: %s; pausing for 1s", exc)
                time.sleep(1.0)
                return None
            raise
        if not client_allowed(family, addr, self._allowed):
            log.warning("refusing FastCGI connection from %s: not in FCGI_WEB_SERVER_ADDRS", addr[0])
            sock.close()
            return None
        configure_client_socket(sock, family)
        conn = self._connectionClass(sock, addr, self)
        with self._lock:
            self._connections.add(conn)
        return conn

    # -- drain -----------------------------------------------------------------
    def _begin_drain(self) -> None:
        """Start draining (once): from the accept loop, or the inline monitor."""
        with self._drain_lock:
            if self.draining:
                return
            self._deadline = time.monotonic() + self.graceful_timeout
            self.draining = True
            os.write(self._drain_w, b"x")   # never read: stays readable
        if self._on_drain is not None:
            self._on_drain()
        log.info("draining: %d connection(s) open, %d request(s) in flight; deadline %.1fs",
                 self._busy(), self._inflight_count(), self.graceful_timeout)

    def _drain(self) -> int:
        self._begin_drain()
        while True:
            if self._busy() == 0:
                log.info("drained: every request finished")
                return 0
            remaining = self._deadline - time.monotonic()
            if remaining <= 0:
                self._log_cut()
                return 1
            select.select([self._wake_r], [], [], min(remaining, 1.0))
            self._drain_wake_pipe()

    def _log_cut(self) -> None:
        cut = [c.current for c in self.connections() if c.current]
        log.error("graceful timeout %.1fs passed: cutting %d request(s): %s "
                  "(and %d idle connection(s))",
                  self.graceful_timeout, len(cut), describe_inflight(cut, time.time()),
                  self._busy() - len(cut))

    def _monitor(self) -> None:
        """Inline mode's helper thread.  The serving thread may be inside the
        application or waiting on a connection; this thread waits on the
        wake-up pipe, starts the drain when a stop was requested (the drain
        pipe then wakes the serving thread's waits) and enforces the drain
        deadline.  It blocks the asynchronous signals, so that they are
        delivered to the main thread, where their handlers run."""
        signal.pthread_sigmask(signal.SIG_BLOCK, signal.valid_signals() - _SYNCHRONOUS_SIGNALS)
        quick_until = 0.0
        while not self._finished.is_set():
            if self.stop_requested:
                self._begin_drain()
                break
            # The C-level signal handler writes the pipe before the Python
            # handler sets the flag in the main thread: after a wake-up, look
            # again soon.
            now = time.monotonic()
            r, _, _ = select.select([self._wake_r], [], [], 0.02 if now < quick_until else 1.0)
            if r:
                self._drain_wake_pipe()
                quick_until = time.monotonic() + 1.0
        else:
            return
        if self._finished.wait(max(0.0, self._deadline - time.monotonic())):
            return
        if self._finished.is_set():
            return
        self._log_cut()
        (self._on_deadline or exit_past_deadline)()

    def _inflight_count(self) -> int:
        return sum(1 for c in self.connections() if c.current)

    # -- WSGI gateway --------------------------------------------------------
    def handler(self, req: Request) -> tuple:
        """Run the application for one request.  Returns (protocolStatus,
        appStatus); raises ResponseCut when the response cannot be finished."""
        environ = self._environ(req)
        observer = self.observer
        if observer is None:
            return self._run_app(req, environ)
        token = observer.begin(environ["REQUEST_METHOD"], environ.get("REQUEST_URI", ""))
        try:
            return self._run_app(req, environ)
        finally:
            observer.end(token)

    def _environ(self, req: Request) -> dict:
        environ = req.params
        if self.environ:
            environ.update(self.environ)
        environ.update(self._wsgi_keys)
        environ["wsgi.input"] = req.stdin
        https = environ.get("HTTPS", "off").lower() in ("on", "1")
        environ["wsgi.url_scheme"] = "https" if https or environ.get("REQUEST_SCHEME") == "https" else "http"
        sanitize_environ(environ)
        return environ

    def _run_app(self, req: Request, environ: dict) -> tuple:
        conn: Connection = req._conn
        method = environ["REQUEST_METHOD"]
        state: dict = {"status": None, "headers": None, "sent": False, "chunks": 0}
        result = None

        def start_response(status, headers, exc_info=None):
            if exc_info is not None:
                try:
                    if state["sent"]:
                        raise exc_info[1].with_traceback(exc_info[2])
                finally:
                    exc_info = None
            elif state["status"] is not None:
                raise AssertionError("start_response called twice without exc_info")
            check_response_start(status, headers)
            state["status"], state["headers"] = status, list(headers)
            return write

        def write(data):
            if state["status"] is None:
                raise AssertionError("write() before start_response()")
            if not isinstance(data, (bytes, bytearray)):
                raise TypeError("response body must be bytes, got %s" % type(data).__name__)
            send(data)
            flush()   # the application goes on after write(): send it now

        def send(data):
            """Queue ``data`` (and the head before the first part)."""
            if req.aborted:
                return
            if state["chunks"]:
                conn.poll_input(req)   # an abort or the peer gone: stop early
                if req.aborted:
                    return
            state["chunks"] += 1
            if not state["sent"]:
                status, headers = state["status"], state["headers"]
                if result is not None and not any(k.lower() == "content-length" for k, _ in headers):
                    try:
                        if len(result) == 1:
                            headers.append(("Content-Length", str(len(data))))
                    except TypeError:
                        pass
                head = response_head(status, headers)
                state["body"] = status_has_body(method, status)
                state["sent"] = True
                if state["body"] and data and len(data) < MAX_CONTENT:
                    _send_stdout(head + bytes(data))   # one record for small responses
                    return
                _send_stdout(head)
            if state["body"] and data:
                _send_stdout(data)

        def _send_stdout(data):
            try:
                req.stdout.write(data)
            except OSError as exc:
                raise ResponseCut("web server went away: %s" % exc) from None

        def flush():
            try:
                conn.flush()
            except OSError as exc:
                raise ResponseCut("web server went away: %s" % exc) from None

        try:
            result = self.application(environ, start_response)
            # A list or tuple holds the whole body: no application code runs
            # while it is sent, so it is queued whole and goes out with the
            # end of the request in one send.  Anything else is an iterator
            # that may take its time between parts: each part is sent at once.
            whole = type(result) in (list, tuple)
            try:
                for data in result:
                    if not isinstance(data, (bytes, bytearray)):
                        raise TypeError("response body must be an iterable of bytes, got %s"
                                        % type(data).__name__)
                    if data:
                        if state["status"] is None:
                            raise AssertionError("body before start_response()")
                        send(data)
                        if not whole:
                            flush()
                    if req.aborted:
                        log.info("request aborted by the web server: %s %s",
                                 method, environ.get("REQUEST_URI", ""))
                        break
                if not state["sent"] and not req.aborted:
                    if state["status"] is None:
                        raise AssertionError("application returned without calling start_response()")
                    send(b"")
            finally:
                close = getattr(result, "close", None)
                if close is not None:
                    close()
        except ResponseCut:
            raise
        except Exception:
            tb_text = traceback.format_exc()
            log.error("application error in %s %s:\n%s", method,
                      environ.get("REQUEST_URI", ""), tb_text.rstrip())
            if state["sent"]:
                raise ResponseCut("application error after the response headers were sent") from None
            try:
                req.stdout.write(error_page(self.debug, tb_text))
            except OSError as exc:
                raise ResponseCut("web server went away: %s" % exc) from None
        return FCGI_REQUEST_COMPLETE, 0

    def error(self, req) -> None:  # flup's hook; our handler never raises to Request.run
        req.stdout.write(error_page(self.debug, traceback.format_exc()))


def sanitize_environ(environ: dict) -> None:
    """Fill the CGI keys WSGI requires; derive PATH_INFO from nginx's
    DOCUMENT_URI (decoded) when the web server sets none; drop the body's
    length and type repeated as HTTP_* (a web server passing every header,
    e.g. nginx with the distribution's fastcgi_params: CGI and PEP 3333
    forbid them next to CONTENT_LENGTH/CONTENT_TYPE)."""
    environ.pop("HTTP_CONTENT_LENGTH", None)
    environ.pop("HTTP_CONTENT_TYPE", None)
    environ.setdefault("SCRIPT_NAME", "")
    uri = environ.get("REQUEST_URI", "")
    if not environ.get("PATH_INFO"):
        path = environ.get("DOCUMENT_URI")
        if path is None:
            from urllib.parse import unquote_to_bytes
            path = unquote_to_bytes(uri.split("?", 1)[0]).decode("latin-1")
        script = environ["SCRIPT_NAME"]
        if script and path.startswith(script):
            path = path[len(script):]
        environ["PATH_INFO"] = path
    if not environ.get("QUERY_STRING") and "?" in uri:
        environ["QUERY_STRING"] = uri.split("?", 1)[1]
    environ.setdefault("QUERY_STRING", "")
    for name, default in (("REQUEST_METHOD", "GET"), ("SERVER_NAME", "localhost"),
                          ("SERVER_PORT", "80"), ("SERVER_PROTOCOL", "HTTP/1.0")):
        environ.setdefault(name, default)


def configure_client_socket(sock: socket.socket, family: int) -> None:
    """Per-connection socket options: TCP_NODELAY on TCP (flup set none, bug 8).
    Non-blocking: every wait is our own select with the idle timeout, so a
    stuck peer cannot hold a thread forever.  (Python sockets are created
    close-on-exec already.)"""
    if family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setblocking(False)
