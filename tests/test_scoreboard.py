"""Tier 1: the scoreboard with real files, no processes except one writer child."""
import multiprocessing
import os
import threading

import psutil
import pytest

from fcgi_toolkit import scoreboard


def _writer(path, slot, slots, ready, go):
    w = scoreboard.SlotWriter(path, slot, slots, os.getpid(), psutil.Process().create_time())
    w.set_ready()
    token = w.begin("POST", "/upload?x=1")
    ready.set()
    go.wait(10)
    w.end(token)


def test_reader_in_another_process_sees_updates_at_once(tmp_path):
    path = str(tmp_path / "sb")
    ctx = multiprocessing.get_context("fork")
    ready, go = ctx.Event(), ctx.Event()
    child = ctx.Process(target=_writer, args=(path, 2, 4, ready, go))
    child.start()
    try:
        assert ready.wait(10)
        board = scoreboard.Scoreboard(path, 4)
        rec = board.read(2)
        assert rec is not None and rec.pid == child.pid
        assert rec.ready and rec.inflight == 1 and rec.requests == 0
        assert (rec.method, rec.uri) == ("POST", "/upload?x=1")
        assert rec.req_start > 0
        assert board.read(0) is None and board.read(3) is None
        go.set()
        child.join(10)
        rec = board.read(2)
        assert rec.requests == 1 and rec.inflight == 0 and rec.req_start == 0
    finally:
        go.set()
        child.join(10)


def test_slot_of_dead_process_is_not_live(tmp_path):
    path = str(tmp_path / "sb")
    me = psutil.Process()
    w = scoreboard.SlotWriter(path, 0, 1, me.pid, me.create_time())
    rec = scoreboard.Scoreboard(path, 1).read(0)
    assert scoreboard.is_live(rec, me.pid, me.create_time())
    # Same pid, other start time: a reused pid.
    assert not scoreboard.is_live(rec, me.pid, me.create_time() + 5)
    # No such process.
    assert not scoreboard.is_live(rec, me.pid, None)
    w.clear()
    assert scoreboard.Scoreboard(path, 1).read(0) is None


def test_oldest_inflight_request_is_shown_and_uri_truncated(tmp_path):
    path = str(tmp_path / "sb")
    now = [100.0]
    w = scoreboard.SlotWriter(path, 0, 1, 1, 1.0, clock=lambda: now[0])
    first = w.begin("GET", "/a" * 200)
    now[0] = 105.0
    second = w.begin("PUT", "/b")
    board = scoreboard.Scoreboard(path, 1)
    rec = board.read(0)
    assert rec.inflight == 2 and rec.req_start == 100.0 and rec.method == "GET"
    assert len(rec.uri) == scoreboard.URI_MAX
    assert rec.request_age(110.0) == 10.0
    w.end(first)
    rec = board.read(0)
    assert rec.inflight == 1 and rec.method == "PUT" and rec.req_start == 105.0
    assert rec.last_duration == 5.0
    w.end(second)
    assert board.read(0).requests == 2


def test_concurrent_writes_are_never_torn(tmp_path):
    path = str(tmp_path / "sb")
    w = scoreboard.SlotWriter(path, 0, 1, 1, 1.0)
    stop = threading.Event()

    def churn():
        while not stop.is_set():
            w.end(w.begin("GET", "/x"))

    threads = [threading.Thread(target=churn) for _ in range(3)]
    for t in threads:
        t.start()
    board = scoreboard.Scoreboard(path, 1)
    try:
        for _ in range(3000):
            rec = board.read(0)
            # In-flight bookkeeping must be consistent within one read.
            assert (rec.inflight == 0) == (rec.req_start == 0.0)
            assert rec.inflight <= 3
    finally:
        stop.set()
        for t in threads:
            t.join()


def test_missing_file_reads_as_empty(tmp_path):
    assert scoreboard.Scoreboard(str(tmp_path / "none"), 3).read_all() == [None, None, None]


def test_slot_out_of_range(tmp_path):
    with pytest.raises(ValueError):
        scoreboard.SlotWriter(str(tmp_path / "sb"), 3, 3, 1, 1.0)


def test_rss_is_published_at_ready_and_after_requests_at_most_every_interval(tmp_path):
    path = str(tmp_path / "sb")
    me = psutil.Process()
    wall, tick = [1000.0], [50.0]
    w = scoreboard.SlotWriter(path, 0, 1, me.pid, me.create_time(), clock=lambda: wall[0],
                              rss_every=0.05, monotonic=lambda: tick[0])
    board = scoreboard.Scoreboard(path, 1)
    try:
        assert board.read(0).rss == 0                   # nothing measured before ready
        w.set_ready()
        rec = board.read(0)
        assert rec.rss_time == 1000.0
        assert abs(rec.rss - me.memory_info().rss) < 8 * 1024 * 1024
        first = rec.rss
        ballast = bytearray(64 * 1024 * 1024)           # zero-filled pages: touch them
        for i in range(0, len(ballast), 4096):
            ballast[i] = 1
        wall[0], tick[0] = 1000.5, 50.01                # within the interval: no new value
        w.end(w.begin("GET", "/"))
        assert (board.read(0).rss, board.read(0).rss_time) == (first, 1000.0)
        wall[0], tick[0] = 1001.0, 50.06                # interval passed: measured again
        w.end(w.begin("GET", "/"))
        rec = board.read(0)
        assert rec.rss_time == 1001.0 and rec.rss >= first + 60 * 1024 * 1024
        assert rec.requests == 2
        del ballast
        w.clear()
        assert board.read(0) is None
    finally:
        w.close()
        board.close()


def test_no_rss_published_when_not_asked(tmp_path):
    path = str(tmp_path / "sb")
    w = scoreboard.SlotWriter(path, 0, 1, 1, 1.0)
    w.set_ready()
    w.end(w.begin("GET", "/"))
    rec = scoreboard.Scoreboard(path, 1).read(0)
    assert (rec.rss, rec.rss_time) == (0, 0.0) and rec.requests == 1


def test_slot_layout_fits_and_keeps_every_field(tmp_path):
    assert scoreboard._FORMAT.size <= scoreboard.SLOT_SIZE
    path = str(tmp_path / "sb")
    w = scoreboard.SlotWriter(path, 1, 2, 7, 3.5, clock=lambda: 9.0)
    w.set_ready()
    w.begin("DELETE", "/" + "u" * 500)
    rec = scoreboard.Scoreboard(path, 2).read(1)
    assert (rec.pid, rec.started, rec.inflight, rec.method) == (7, 3.5, 1, "DELETE")
    assert rec.uri == ("/" + "u" * 500)[:scoreboard.URI_MAX]
    assert scoreboard.Scoreboard(path, 2).read(0) is None


def test_baseline_is_the_rss_at_ready_then_after_the_first_requests(tmp_path):
    path = str(tmp_path / "sb")
    me = psutil.Process()
    tick = [50.0]
    w = scoreboard.SlotWriter(path, 0, 1, me.pid, me.create_time(), clock=lambda: 1000.0,
                              rss_every=60.0, monotonic=lambda: tick[0])
    board = scoreboard.Scoreboard(path, 1)
    try:
        assert board.read(0).baseline == 0              # unknown before ready
        w.set_ready()
        at_ready = board.read(0).baseline
        assert at_ready == board.read(0).rss > 0
        ballast = bytearray(64 * 1024 * 1024)
        for i in range(0, len(ballast), 4096):
            ballast[i] = 1
        for _ in range(scoreboard.BASELINE_REQUESTS - 1):
            w.end(w.begin("GET", "/"))
        assert board.read(0).baseline == at_ready       # rss_every 60 s: nothing new yet
        w.end(w.begin("GET", "/"))                      # request BASELINE_REQUESTS: measured
        assert board.read(0).baseline >= at_ready + 60 * 1024 * 1024
        del ballast
        fixed = board.read(0).baseline
        tick[0] += 120
        w.end(w.begin("GET", "/"))                      # later requests never move it
        assert board.read(0).baseline == fixed
    finally:
        w.close()
        board.close()


def test_a_warm_standby_says_so_with_its_baseline_then_takes_over(tmp_path):
    path = str(tmp_path / "sb")
    w = scoreboard.SlotWriter(path, 1, 3, os.getpid(), psutil.Process().create_time(),
                              rss_every=0.05)
    board = scoreboard.Scoreboard(path, 3)
    w.set_standby()
    rec = board.read(1)
    assert rec.standby and not rec.ready and rec.baseline > 0 and rec.rss == rec.baseline
    w.set_ready()
    rec = board.read(1)
    assert rec.ready and not rec.standby
    w.set_draining()
    rec = board.read(1)
    assert rec.ready and rec.draining and not rec.standby
    w.close()
    board.close()
