"""Rolling reload for real: ``fcgi-toolkit reload``, a failing new version, watched files."""
from __future__ import annotations

import re
import threading
import time

import pytest

from harness import wait_for

pytestmark = pytest.mark.integration

FAST = {"check_interval": 0.5, "ready_timeout": "15s"}


def versioned(cluster, tmp_path, version="1", **sections):
    """A cluster of wd_version; its version file is version.txt next to deploy.toml."""
    # The cluster fixture puts its first cluster's deploy.toml in tmp_path/cluster0.
    vfile = tmp_path / "cluster0" / "version.txt"
    vfile.parent.mkdir(parents=True, exist_ok=True)
    vfile.write_text(version)
    c = cluster("wd_version:application", name="wd",
                recycle=dict(FAST, **sections.pop("recycle", {})), **sections)
    assert c.deploy_path == str(vfile.parent / "deploy.toml")
    return c, vfile


class ReadyWatcher(threading.Thread):
    """The fewest ready workers seen while it runs (a replacement still STARTING whose
    slot says ready counts, as for the watchdog)."""

    def __init__(self, cluster):
        super().__init__(daemon=True)
        self.c = cluster
        self.min_ready = None
        self.halt = threading.Event()

    def run(self):
        while not self.halt.wait(0.1):
            try:
                n = len(self.c.ready_workers(starting=True))
            except OSError:
                continue
            self.min_ready = n if self.min_ready is None else min(self.min_ready, n)

    def stop(self):
        self.halt.set()
        self.join(10)


def test_reload_under_load_replaces_every_worker_with_zero_failures(cluster, tmp_path):
    c, vfile = versioned(cluster, tmp_path)
    before = c.ready_workers()
    assert c.get("/").text.startswith("version 1 ")
    vfile.write_text("2")
    watcher = ReadyWatcher(c)
    watcher.start()
    load = c.load("/", threads=3, duration=12, pause=0.01).start()
    try:
        wait_for(lambda: load.total >= 30, 10, "the load to be served before the reload")
        r = c.toolkit("reload", "-c", c.deploy_path, timeout=60)
    finally:
        load.join()
        watcher.stop()
    assert r.returncode == 0, r.stdout + r.stderr
    assert "reloaded 2 workers" in r.stdout
    assert load.failed == 0, load.summary()
    after = c.wait_ready(2, timeout=10)
    assert not set(before.values()) & set(after.values()), (before, after)
    for _ in range(4):
        assert c.get("/").text.startswith("version 2 ")
    assert watcher.min_ready >= 2
    statuses = c.access_log_statuses()
    assert statuses[502] == 0 and statuses[504] == 0, statuses


def test_reload_to_a_version_that_fails_to_import_stops_and_keeps_old_workers(cluster, tmp_path):
    c, vfile = versioned(cluster, tmp_path)
    before = c.ready_workers()
    vfile.write_text("broken")
    r = c.toolkit("reload", "-c", c.deploy_path, timeout=60)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "ImportError: wd_version cannot load: the version file says broken" in r.stderr
    assert c.ready_workers() == before
    for _ in range(4):
        assert c.get("/").text.startswith("version 1 ")
    assert "rolling reload stopped" in c.watchdog_log()


def test_editing_a_watched_file_under_load_gives_one_rolling_reload(cluster, tmp_path):
    vfile = tmp_path / "cluster0" / "version.txt"
    c, vfile = versioned(cluster, tmp_path, recycle={"watch": [str(vfile)], "debounce": "1s"})
    before = c.ready_workers()
    load = c.load("/", threads=3, duration=12, pause=0.01).start()
    try:
        wait_for(lambda: load.total >= 30, 10, "the load to be served before the edits")
        for version in ("2", "3", "4"):       # many writes ...
            vfile.write_text(version)
            time.sleep(0.2)   # pacing: several writes inside one debounce window
        # ... one reload, to the last version.
        wait_for(lambda: "rolling reload done" in c.watchdog_log(), 30, "the rolling reload")
    finally:
        load.join()
    assert load.failed == 0, load.summary()
    log = c.watchdog_log()
    assert len(re.findall(r"rolling reload begins \(watch\)", log)) == 1, log
    after = c.wait_ready(2, timeout=10)
    assert not set(before.values()) & set(after.values())
    assert c.get("/").text.startswith("version 4 ")
