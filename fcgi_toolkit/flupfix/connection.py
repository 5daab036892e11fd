"""One FastCGI connection: its request, its input and output streams.

One thread per connection (a pool thread, or the main thread when the
server runs inline), one request at a time: FCGI_MPXS_CONNS is 0, and a
second BEGIN_REQUEST is answered FCGI_CANT_MPX_CONN.  Bug numbers refer to
``docs/flup6-bugs.rst``.
"""
from __future__ import annotations

import errno
import logging
import select
import socket
import time
from typing import TYPE_CHECKING, Any, Optional

from flup.server import fcgi_base
from flup.server.fcgi_base import (
    FCGI_ABORT_REQUEST, FCGI_BEGIN_REQUEST, FCGI_CANT_MPX_CONN, FCGI_DATA,
    FCGI_END_REQUEST, FCGI_GET_VALUES, FCGI_GET_VALUES_RESULT, FCGI_KEEP_CONN,
    FCGI_NULL_REQUEST_ID, FCGI_PARAMS, FCGI_REQUEST_COMPLETE, FCGI_STDIN,
    FCGI_STDOUT, FCGI_UNKNOWN_ROLE, FCGI_UNKNOWN_TYPE,
)

from .records import (
    BEGIN_BODY, END_BODY, HEADER, HEADER_LEN, MAX_PARAMS, UNKNOWN_BODY,
    ProtocolError, decode_pairs, decode_params, encode_pair,
)
from .streams import InputStream, OutputStream
from .transport import RecordTransport

if TYPE_CHECKING:
    from .server import WSGIServer

log = logging.getLogger("fcgi_toolkit.worker")

# While draining, a connection with no request in the application is given
# this long between bytes (instead of idle_timeout), so it cannot hold the
# worker until its hard deadline.
DRAIN_READ_GRACE = 1.0

_PEER_GONE = (errno.EPIPE, errno.ECONNRESET, errno.ENOTCONN, errno.EBADF, errno.ESHUTDOWN)


class ResponseCut(Exception):
    """The response cannot be finished: close the connection without END_REQUEST."""


class Request(fcgi_base.Request):
    """One FastCGI request.  flup's ``run`` printed the traceback as str into
    a bytes stream, so the TypeError escaped and the request never ended
    (bug 1); here the handler never raises for an app error, and a response
    that cannot be finished closes the connection."""

    def __init__(self, conn: "Connection", inputStreamClass: type):
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


class Connection(RecordTransport, fcgi_base.Connection):
    """One FastCGI connection, served by one thread: waits (drain-aware),
    dispatches records to their handlers, runs the request, ends it."""

    _multiplexed = False
    _inputStreamClass = InputStream

    def __init__(self, sock: socket.socket, addr: Any, server: "WSGIServer"):
        fcgi_base.Connection.__init__(self, sock, addr, server)
        RecordTransport.__init__(self, sock)
        self.broken: Optional[str] = None
        self.current: Optional[tuple] = None   # (method, uri, start) while in the app
        # No request began on it yet: the web server connected to send one (and
        # may be writing it), so a drain waits for it (DRAIN_READ_GRACE) instead
        # of closing, which the web server would see as a failed request.
        self.fresh = True

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

    # -- waiting -------------------------------------------------------------
    def _read_timeout(self) -> Optional[float]:
        timeout = self.server.idle_timeout or None   # 0: no timeout
        if self.server.draining and self.current is None:
            timeout = min(timeout or DRAIN_READ_GRACE, DRAIN_READ_GRACE)
        return timeout

    def _wait_for_record(self) -> bool:
        """Wait for the next record.  False: close quietly (draining while idle
        between requests; a fresh connection gets DRAIN_READ_GRACE for its first)."""
        if self._rpos < len(self._rbuf):
            return True
        if not self._requests and self.server.draining and not self.fresh:
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
            if idle and not self.fresh:
                r, _, _ = select.select([self._sock], [], [], 0)
                return bool(r)
            # draining started mid-record (or before a fresh connection's first
            # record): wait again with the drain's timeout

    # -- input ---------------------------------------------------------------
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
        only when the app read its body, so an abort was never seen (bug 14)."""
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
        return self._peer_has_nothing_unread()

    # -- record handlers -----------------------------------------------------
    def _do_begin_request(self, rid: int, content: bytes) -> None:
        if len(content) != BEGIN_BODY.size:
            raise ProtocolError("BEGIN_REQUEST body of %d bytes" % len(content))
        role, flags = BEGIN_BODY.unpack(content)
        self.fresh = False
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
        # (flup decoded each record on its own, bug 4).
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

    # -- ending --------------------------------------------------------------
    def end_request(self, req: Request, appStatus: int = 0,
                    protocolStatus: int = FCGI_REQUEST_COMPLETE, remove: bool = True) -> None:
        """Send END_REQUEST together with whatever the response queued; close
        the connection unless the web server asked to keep it."""
        self.queue_record(FCGI_END_REQUEST, req.requestId, END_BODY.pack(appStatus, protocolStatus))
        self.flush()
        if remove:
            self._requests.pop(req.requestId, None)
        if not (req.flags & FCGI_KEEP_CONN) and not self._requests:
            self.close(linger=not self._peer_done(req))
