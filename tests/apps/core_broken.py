"""An app that cannot be imported: used to check that `check` and the worker's log report it."""
from __future__ import annotations

import core_missing_dependency_xyz  # noqa: F401  (does not exist, on purpose)


def application(environ, start_response):  # pragma: no cover - never imported
    start_response("200 OK", [])
    return [b""]
