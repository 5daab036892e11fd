"""The WSGI gateway (PEP 3333): the environ, ``start_response``, the body.

:class:`WSGIGateway` is the server's request handler (flup's ``handler``
hook); :class:`Response` holds one response's state.  The pure checks are
module functions, tested with plain values.  Bug numbers refer to
``docs/flup6-bugs.rst``.
"""
from __future__ import annotations

import logging
import re
import traceback
from typing import Any, Callable, Optional, Protocol, Sequence
from urllib.parse import unquote_to_bytes

from flup.server.fcgi_base import FCGI_REQUEST_COMPLETE

from .connection import Request, ResponseCut
from .records import MAX_CONTENT
from .streams import ErrorStream

log = logging.getLogger("fcgi_toolkit.worker")

_TOKEN = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")
_STATUS = re.compile(r"^[1-9][0-9]{2} ")
_NO_BODY_STATUS = ("204", "304")
# Header names that passed the checks (apps send the same few again and
# again): a set lookup instead of a regular expression, bounded.
_GOOD_NAMES: set = set()


class RequestObserver(Protocol):
    """What the server reports per request (the scoreboard's SlotWriter fits)."""

    def begin(self, method: str, uri: str) -> int: ...

    def end(self, token: int) -> None: ...


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


def request_paths(uri: str, mount: str) -> Optional[tuple]:
    """(SCRIPT_NAME, PATH_INFO) from the request target as the client sent
    it (``REQUEST_URI``) and the mount prefix (``nginx.location`` without its
    trailing slash, "" at the root): the path is decoded once (percent
    escapes to bytes, as latin-1 text, as PEP 3333 wants), slashes are not
    merged and dot segments are left alone, as gunicorn and uWSGI do with the
    raw request line.  None when the path is not under the mount (then the
    caller keeps what the web server said).  An absolute-form target
    ("http://host/x", RFC 9112 3.2.2) counts from its path."""
    query = uri.find("?")
    path = uri if query < 0 else uri[:query]
    if not path.startswith("/"):
        scheme = path.find("://")
        if scheme < 0:
            return None   # "*" (OPTIONS) or not a path at all
        slash = path.find("/", scheme + 3)
        path = "/" if slash < 0 else path[slash:]
    if "%" in path:
        path = unquote_to_bytes(path).decode("latin-1")
    if not mount:
        return "", path
    if path.startswith(mount) and (len(path) == len(mount) or path[len(mount)] == "/"):
        return mount, path[len(mount):]
    return None


def sanitize_environ(environ: dict, mount: str = "", from_uri: bool = False) -> None:
    """Fill the CGI keys WSGI requires and set SCRIPT_NAME and PATH_INFO.

    With ``from_uri`` (``web.path_info = "request_uri"``, the worker's
    default) both come from REQUEST_URI and ``mount`` (see
    :func:`request_paths`) whatever the web server sent: web servers send a
    normalised PATH_INFO (nginx's ``$uri`` merges slashes, lighttpd
    simplifies the path, Apache's mod_proxy_fcgi sends none at all).
    Without it, the web server's PATH_INFO is kept when it sent a non-empty
    one; otherwise they are derived the same way (flup6 took the raw,
    undecoded REQUEST_URI as PATH_INFO and ignored the mount, bug 18).  With
    no REQUEST_URI, or a path outside the mount: the web server's values,
    else nginx's DOCUMENT_URI.

    Also drops the body's length and type repeated as HTTP_* (a web server
    passing every header, e.g. nginx with the distribution's
    fastcgi_params: CGI and PEP 3333 forbid them next to
    CONTENT_LENGTH/CONTENT_TYPE, bug 17)."""
    environ.pop("HTTP_CONTENT_LENGTH", None)
    environ.pop("HTTP_CONTENT_TYPE", None)
    uri = environ.get("REQUEST_URI", "")
    paths = None
    if uri and (from_uri or not environ.get("PATH_INFO")):
        paths = request_paths(uri, mount)
    if paths is not None:
        environ["SCRIPT_NAME"], environ["PATH_INFO"] = paths
    else:
        script = environ.setdefault("SCRIPT_NAME", "")
        if not environ.get("PATH_INFO"):
            path = environ.get("DOCUMENT_URI", "")
            if script and path.startswith(script):
                path = path[len(script):]
            environ["PATH_INFO"] = path
    if not environ.get("QUERY_STRING") and "?" in uri:
        environ["QUERY_STRING"] = uri.split("?", 1)[1]
    environ.setdefault("QUERY_STRING", "")
    for name, default in (("REQUEST_METHOD", "GET"), ("SERVER_NAME", "localhost"),
                          ("SERVER_PORT", "80"), ("SERVER_PROTOCOL", "HTTP/1.0")):
        environ.setdefault(name, default)


class Response:
    """One request's response: ``start_response``, ``write`` and the body
    loop.  The head goes out with the first part of the body; a list or
    tuple body is queued whole and leaves with END_REQUEST in one send."""

    __slots__ = ("req", "conn", "method", "status", "headers", "sent", "body", "chunks", "result")

    def __init__(self, req: Request, method: str):
        self.req = req
        self.conn = req._conn
        self.method = method
        self.status: Optional[str] = None
        self.headers: Optional[list] = None
        self.sent = False        # the head went out
        self.body = True         # the status and method allow a body
        self.chunks = 0
        self.result: Any = None  # the app's iterable, once it returned

    def start_response(self, status: str, headers: list, exc_info: Any = None) -> Callable:
        if exc_info is not None:
            try:
                if self.sent:
                    raise exc_info[1].with_traceback(exc_info[2])
            finally:
                exc_info = None
        elif self.status is not None:
            raise AssertionError("start_response called twice without exc_info")
        check_response_start(status, headers)
        self.status, self.headers = status, list(headers)
        return self.write

    def write(self, data: bytes) -> None:
        """PEP 3333's ``write()`` callable."""
        if self.status is None:
            raise AssertionError("write() before start_response()")
        if not isinstance(data, (bytes, bytearray)):
            raise TypeError("response body must be bytes, got %s" % type(data).__name__)
        self.send(data)
        self.flush()   # the application goes on after write(): send it now

    def send(self, data: bytes) -> None:
        """Queue ``data`` (and the head before the first part)."""
        req = self.req
        if req.aborted:
            return
        if self.chunks:
            self.conn.poll_input(req)   # an abort or the peer gone: stop early
            if req.aborted:
                return
        self.chunks += 1
        if not self.sent:
            head = self._head(data)
            if self.body and data and len(data) < MAX_CONTENT:
                self._stdout(head + bytes(data))   # one record for small responses
                return
            self._stdout(head)
        if self.body and data:
            self._stdout(data)

    def _head(self, first: bytes) -> bytes:
        """The CGI head, with a Content-Length when the body is a one-part
        sequence (as flup does)."""
        status, headers = self.status, self.headers
        if self.result is not None and not any(k.lower() == "content-length" for k, _ in headers):
            try:
                if len(self.result) == 1:
                    headers.append(("Content-Length", str(len(first))))
            except TypeError:
                pass
        self.body = status_has_body(self.method, status)
        self.sent = True
        return response_head(status, headers)

    def _stdout(self, data: Any) -> None:
        try:
            self.req.stdout.write(data)
        except OSError as exc:
            raise ResponseCut("web server went away: %s" % exc) from None

    def flush(self) -> None:
        try:
            self.conn.flush()
        except OSError as exc:
            raise ResponseCut("web server went away: %s" % exc) from None

    def send_result(self, result: Any, uri: str) -> None:
        """Send the app's iterable and call its ``close()`` once.  A list or
        tuple holds the whole body: no application code runs while it is
        sent, so it is queued whole.  Anything else is an iterator that may
        take its time between parts: each part is sent at once."""
        self.result = result
        req = self.req
        whole = type(result) in (list, tuple)
        try:
            for data in result:
                if not isinstance(data, (bytes, bytearray)):
                    raise TypeError("response body must be an iterable of bytes, got %s"
                                    % type(data).__name__)
                if data:
                    if self.status is None:
                        raise AssertionError("body before start_response()")
                    self.send(data)
                    if not whole:
                        self.flush()
                if req.aborted:
                    log.info("request aborted by the web server: %s %s", self.method, uri)
                    break
            if not self.sent and not req.aborted:
                if self.status is None:
                    raise AssertionError("application returned without calling start_response()")
                self.send(b"")
        finally:
            close = getattr(result, "close", None)
            if close is not None:
                close()


class WSGIGateway:
    """The server's request handler (a mixin of :class:`.server.WSGIServer`,
    which provides ``application``, ``environ``, ``debug``, ``observer``
    and ``errors``).  ``mount`` and ``path_from_uri``: see
    :func:`sanitize_environ`."""

    application: Callable
    environ: dict
    debug: bool
    observer: Optional[RequestObserver]
    errors: ErrorStream
    multithreaded: bool

    def _init_gateway(self, mount: str, path_from_uri: bool) -> None:
        self.mount = mount.rstrip("/")
        self.path_from_uri = path_from_uri
        # What every environ gets (PEP 3333); copied into it per request.
        self._wsgi_keys = {"wsgi.version": (1, 0), "wsgi.errors": self.errors,
                           "wsgi.multithread": self.multithreaded, "wsgi.multiprocess": True,
                           "wsgi.run_once": False}

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
        sanitize_environ(environ, self.mount, self.path_from_uri)
        return environ

    def _run_app(self, req: Request, environ: dict) -> tuple:
        method = environ["REQUEST_METHOD"]
        response = Response(req, method)
        try:
            result = self.application(environ, response.start_response)
            response.send_result(result, environ.get("REQUEST_URI", ""))
        except ResponseCut:
            raise
        except Exception:
            tb_text = traceback.format_exc()
            log.error("application error in %s %s:\n%s", method,
                      environ.get("REQUEST_URI", ""), tb_text.rstrip())
            if response.sent:
                raise ResponseCut("application error after the response headers were sent") from None
            response._stdout(error_page(self.debug, tb_text))
        return FCGI_REQUEST_COMPLETE, 0
