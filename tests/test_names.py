"""names: the one home of slot names, capacity states, formats and timeouts (pure)."""
from __future__ import annotations

from types import SimpleNamespace

from supervisor.states import ProcessStates

from fcgi_toolkit import names, status
from fcgi_toolkit.policy import SlotSnapshot


def test_slot_name_agrees_with_supervisords_own_expansion():
    # The rendered [fcgi-program] names its processes with SUPERVISOR_SLOT_NAME.
    for index in (0, 7, 12):
        expanded = names.SUPERVISOR_SLOT_NAME % {"program_name": "wiki", "process_num": index}
        assert expanded == names.slot_name("wiki", index)
    assert names.slot_names("wiki", 3) == ["wiki_00", "wiki_01", "wiki_02"]


def test_status_and_the_watchdog_count_the_same_capacity():
    """A BACKOFF slot holds its place for both: the watchdog does not start
    another slot for it, and status does not call a stopped slot a hole."""
    backoff = SlotSnapshot(name="wiki_00", index=0, state=ProcessStates.BACKOFF)
    assert backoff.active
    stopped = SlotSnapshot(name="wiki_01", index=1, state=ProcessStates.STOPPED)
    g = status.group_status("wiki", 1, 1, ["wiki_00", "wiki_01"], [backoff, stopped], {}, 0.0)
    assert [w.state for w in g.workers] == ["backoff", "standby"]


def test_life_key_and_same_life():
    assert names.life_key(10, 1700000000.123456) == (10, 1700000000.12)
    assert names.same_life(10, 1700000000.123, 10, 1700000000.1234)
    assert not names.same_life(10, 1700000000.12, 11, 1700000000.12)
    assert not names.same_life(10, None, 10, 1.0)


def test_sizes():
    MB = names.MB
    assert [names.format_size(n) for n in (None, 0, 512 * 1024, 80 * MB, int(80.5 * MB),
                                           301 * MB, 2 * names.GB, int(2.5 * names.GB))] == [
        "-", "0KB", "512KB", "80MB", "80.5MB", "301MB", "2GB", "2.5GB"]


def test_request_wait_is_one_recycle_or_one_per_worker_plus_slack():
    dep = SimpleNamespace(recycle=SimpleNamespace(ready_timeout=30.0, check_interval=1.0),
                          workers=SimpleNamespace(graceful_timeout=20.0, count=4))
    assert names.recycle_time(dep) == 57.0
    assert names.request_wait(dep, "recycle") == 57.0 + names.REQUEST_SLACK
    assert names.request_wait(dep, "reload") == 4 * 57.0 + names.REQUEST_SLACK
