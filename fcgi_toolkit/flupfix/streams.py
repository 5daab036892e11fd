"""The WSGI streams: ``wsgi.input``, FCGI_STDOUT and ``wsgi.errors``.

Bug numbers refer to ``docs/flup6-bugs.rst``.
"""
from __future__ import annotations

import sys
import threading
from typing import Any, Iterable, Optional

from flup.server import fcgi_base

from .records import MAX_CONTENT, ProtocolError


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
    buffer on every record, which is quadratic for long lines (bug 15)."""

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
