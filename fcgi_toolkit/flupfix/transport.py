"""Records over one non-blocking socket: large reads parsed in place, queued
writes sent in one system call, a bounded close.

:class:`RecordTransport` is the byte-moving half of a connection
(:class:`.connection.Connection` adds the FastCGI logic on top).  Every wait
is a ``select`` with a timeout, so a stuck peer cannot hold a thread
(flup6 waits forever, bug 12).  Bug numbers refer to ``docs/flup6-bugs.rst``.
"""
from __future__ import annotations

import errno
import select
import socket
import threading
import time
from typing import Any

from flup.server.fcgi_base import FCGI_VERSION_1

from .records import HEADER, HEADER_LEN, PADDING, ProtocolError

# How long a closing connection waits for the peer's FIN before closing hard.
LINGER = 1.0
# Queued output is sent once it reaches FLUSH_BYTES; up to JOIN_BYTES it is
# joined into one buffer for the send, beyond that gathered by sendmsg.
FLUSH_BYTES = 256 * 1024
JOIN_BYTES = 64 * 1024
IOV_MAX = 512


class RecordTransport:
    """Reads and writes FastCGI records on ``self._sock`` (non-blocking).

    A subclass provides ``server`` (for ``idle_timeout``) and
    :meth:`_wait_readable`, which decides how long a read may wait."""

    server: Any

    def __init__(self, sock: socket.socket):
        self._sock = sock
        self.closed = False
        self._rbuf = bytearray()   # received, not yet parsed from _rpos on
        self._rpos = 0
        self._wbuf: list = []      # records queued for one send
        self._wlen = 0
        self._send_lock = threading.Lock()

    def _wait_readable(self, idle: bool = False) -> bool:
        raise NotImplementedError

    # -- reading -------------------------------------------------------------
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
            out.append(PADDING[padding])
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

    # -- closing -------------------------------------------------------------
    def close(self, linger: bool = False) -> None:
        """Close the connection (after sending what is still queued, if it
        can).  With ``linger``, send our FIN first and read until the peer's
        (bounded: flup waited for it forever, bug 12), so unread input does
        not turn our last records into a reset."""
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
                self._linger(sock)
        except OSError:
            pass
        finally:
            sock.close()

    @staticmethod
    def _linger(sock: socket.socket) -> None:
        sock.shutdown(socket.SHUT_WR)
        deadline = time.monotonic() + LINGER
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            r, _, _ = select.select([sock], [], [], remaining)
            if not r or not sock.recv(65536):
                return

    def _peer_has_nothing_unread(self) -> bool:
        """Nothing waits unread in the kernel (readable means data, or only
        the peer's FIN)."""
        try:
            r, _, _ = select.select([self._sock], [], [], 0)
            return not r or not self._sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        except (OSError, ValueError):
            return False
