"""Shared fixtures: the ``cluster`` factory and the nginx skip for integration tests."""
from __future__ import annotations

import os
import shutil
import sys
import tempfile

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from harness import Cluster, nginx_available  # noqa: E402

#: Integration tests need nginx; they skip (with this reason) only when it is missing.
requires_nginx = pytest.mark.skipif(not nginx_available(), reason="nginx is not on PATH (or in /usr/sbin)")


#: Set when this run made its own short base directory (removed if the run passed).
_SHORT_BASETEMP: list[str] = []


def pytest_configure(config):
    """A short base directory of this run's own: a unix socket path is at most
    100 bytes (the deployment file refuses longer ones), and xdist's
    ``popen-gwN/`` level makes pytest's default base too long.  Its own
    directory (not one fixed name) so that runs side by side never wipe each
    other's.  The xdist workers get theirs below it from the controller."""
    if config.option.basetemp is None and not hasattr(config, "workerinput"):
        config.option.basetemp = tempfile.mkdtemp(prefix="fct-t", dir="/tmp")
        _SHORT_BASETEMP.append(config.option.basetemp)


def pytest_sessionfinish(session, exitstatus):
    if _SHORT_BASETEMP and exitstatus == 0 and not hasattr(session.config, "workerinput"):
        shutil.rmtree(_SHORT_BASETEMP[0], ignore_errors=True)


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
