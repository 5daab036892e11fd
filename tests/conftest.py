"""Shared fixtures: the ``cluster`` factory and the nginx skip for integration tests."""
from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from harness import Cluster, nginx_available  # noqa: E402

#: Integration tests need nginx; they skip (with this reason) only when it is missing.
requires_nginx = pytest.mark.skipif(not nginx_available(), reason="nginx is not on PATH (or in /usr/sbin)")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    setattr(item, "rep_" + rep.when, rep)


@pytest.fixture
def cluster(tmp_path, request):
    """Factory: ``cluster(app="core_app:application", **sections) -> started Cluster``.

    Every cluster is stopped after the test (also when it failed); on failure
    the tails of its logs are printed.
    """
    started: list[Cluster] = []

    def factory(app: str = "core_app:application", /, **kwargs) -> Cluster:
        # app is positional-only: kwargs may hold the [app] section itself.
        if not nginx_available():
            pytest.skip("nginx is not on PATH (or in /usr/sbin)")
        c = Cluster(tmp_path / ("cluster%d" % len(started)), app, **kwargs)
        started.append(c)
        return c.start()

    yield factory
    failed = getattr(request.node, "rep_call", None) is not None and request.node.rep_call.failed
    for c in reversed(started):
        if failed:
            print("\n===== logs of cluster %s =====\n%s" % (c.base_dir, c.diagnostics()))
        c.stop()
