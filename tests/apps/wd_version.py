"""Reload test app: its version string is read once, at import, from a file.

The file is ``$WD_VERSION_FILE`` if set, else ``version.txt`` next to the
deployment file (``$FCGI_TOOLKIT_DEPLOY``, set by the template).  If the
file says ``broken``, the import fails with an ImportError, as a bad deploy
would.  ``/`` answers "version V PID".
"""
from __future__ import annotations

import os

_PATH = os.environ.get("WD_VERSION_FILE") or os.path.join(
    os.path.dirname(os.environ["FCGI_TOOLKIT_DEPLOY"]), "version.txt")

with open(_PATH, encoding="utf-8") as _f:
    VERSION = _f.read().strip()

if VERSION == "broken":
    raise ImportError("wd_version cannot load: the version file says broken")


def application(environ, start_response):
    body = ("version %s %d\n" % (VERSION, os.getpid())).encode()
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]
