"""Watchdog test app that always fails to import (a missing dependency)."""
from __future__ import annotations

import wd_no_such_dependency  # noqa: F401  (fails: ModuleNotFoundError)


def application(environ, start_response):  # pragma: no cover - never imported
    start_response("200 OK", [])
    return [b""]
