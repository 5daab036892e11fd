"""flup6 1.1.1's threaded FastCGI server, fixed for Python 3 by subclassing.

flup6 stays the dependency: the modules of this package subclass its
``InputStream``, ``OutputStream``, ``Request``, ``Connection`` and
``WSGIServer`` and replace the methods that are broken on Python 3 or unsafe
under supervisord.  Each fix names its flup6 bug by number; the numbers are
those of ``docs/flup6-bugs.rst``, which says for each what flup6 does, what
we do and which test shows it (``tests/flup_compare.py`` runs the
conformance cases against bare flup6 to show which still fail there).

One module per concern:

- :mod:`.records`: the wire format (record headers, name-value pairs), pure;
- :mod:`.transport`: records over a non-blocking socket (parsing in place
  from large reads, queued writes sent in one system call, bounded close);
- :mod:`.streams`: ``wsgi.input``, FCGI_STDOUT, ``wsgi.errors``;
- :mod:`.connection`: one connection's records, its request, its end;
- :mod:`.gateway`: PEP 3333 (environ, ``start_response``, the body loop);
- :mod:`.server`: the accept loop, the drain and the inline monitor.

Threading model: one thread per FastCGI connection, the request runs in
that thread, no multiplexing, and a connection is accepted only while a
thread is free (bug 9), so connections that a busy worker cannot serve stay
in the shared socket's backlog for any worker.  With ``threads > 1`` that is
flup's pool, the main thread only accepts.  With ``threads = 1`` (the
default) the main thread accepts and serves the connection itself: no thread
hand-off per connection; a small monitor thread notices the stop request and
enforces the drain deadline (see :class:`WSGIServer`).  flup's
``fcgi_single`` cannot even be constructed on Python 3 (bug 5).

Request path: records are parsed in place from large reads; the response is
queued and goes out with FCGI_END_REQUEST in one send when the body is a
list or tuple (an iterator's parts are sent as they come); a connection
whose request was read to its end is closed at once, without the lingering
wait for the web server's FIN.
"""
from .gateway import RequestObserver
from .server import WSGIServer, exit_past_deadline
from .streams import ErrorStream

__all__ = ["ErrorStream", "RequestObserver", "WSGIServer", "exit_past_deadline"]
