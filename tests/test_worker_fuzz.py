"""Issue #7 item 4: generated FastCGI record streams thrown at a live worker.

Afterwards the worker still serves a normal request correctly, its RSS has
not grown without bound, and every fuzz connection ended within its deadline.
Bounded: 50 examples, each connection waits at most CLOSE_DEADLINE seconds.
"""
import os
import socket
import struct
import sys
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import fcgiclient as fc  # noqa: E402

CLOSE_DEADLINE = 6.0   # idle_timeout (1 s) + linger (1 s) + slack on a shared machine

_types = st.sampled_from([0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 200, 255])
_ids = st.sampled_from([0, 1, 2, 65535])
_content = st.one_of(
    st.binary(max_size=64),
    st.just(struct.pack("!HB5x", fc.RESPONDER, fc.KEEP_CONN)),
    st.just(struct.pack("!HB5x", fc.RESPONDER, 0)),
    st.just(fc.encode_pairs({"REQUEST_METHOD": "GET", "REQUEST_URI": "/hello"})),
    st.just(fc.encode_pairs({"FCGI_MAX_CONNS": ""})),
)
_record = st.builds(
    lambda version, rtype, rid, content, padding: fc.record(rtype, rid, content, padding, version),
    st.sampled_from([1] * 40 + [0, 2]), _types, _ids, _content, st.integers(0, 8))
_stream = st.one_of(
    st.lists(_record, min_size=1, max_size=8),
    st.lists(_record, min_size=1, max_size=8),
    st.lists(st.one_of(_record, st.binary(min_size=1, max_size=32)), min_size=1, max_size=8))


@pytest.fixture
def worker(tmp_path):
    listener = fc.Listener(tmp_path)
    deploy = fc.write_deploy(tmp_path, idle_timeout="1s", threads=2)
    w = fc.WorkerProcess(deploy, listener, kind="ours")
    try:
        w.wait_ready()
        yield w
    finally:
        w.stop()
        listener.close()


def _rss(pid):
    import psutil
    return psutil.Process(pid).memory_info().rss


def test_fuzzed_record_streams(worker):
    address = worker.listener.address
    # Warm up code paths before taking the RSS baseline.
    for _ in range(20):
        assert fc.request(address, "/hello", timeout=5).status == 200
    baseline = _rss(worker.pid)
    outcomes = []

    @settings(max_examples=50, deadline=None, derandomize=True, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
    @given(stream=_stream, cut=st.sampled_from([0] * 6 + [1, 5, 9, 30]),
           stall=st.sampled_from([False] * 9 + [True]))
    def throw(stream, cut, stall):
        data = b"".join(stream)
        if cut:
            data = data[:max(1, len(data) - cut)]
        conn = fc.FastCGIConnection(address, timeout=CLOSE_DEADLINE)
        try:
            start = time.monotonic()
            try:
                conn.send(data)
                if not stall:
                    conn.sock.shutdown(socket.SHUT_WR)
            except OSError:
                pass   # the worker already closed on us: fine
            closed = conn.wait_closed(CLOSE_DEADLINE)
            outcomes.append((closed, time.monotonic() - start, data))
            assert closed, "fuzz connection not ended within %.0fs: %r" % (CLOSE_DEADLINE, data)
        finally:
            conn.close()

    throw()
    assert len(outcomes) == 50 and all(closed for closed, _, _ in outcomes)
    assert worker.proc.poll() is None
    r = fc.request(address, "/echo", method="POST", body=b"still fine", timeout=5)
    assert r.ended and r.status == 200 and r.body == b"still fine"
    assert "connection thread failed" not in worker.log()   # no bug of ours was hit
    growth = _rss(worker.pid) - baseline
    assert growth < 32 * 1024 * 1024, "RSS grew by %d bytes" % growth
