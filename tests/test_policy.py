"""Pure tests of the watchdog policy: plain values, no processes, no mocks."""
from __future__ import annotations

import random
from dataclasses import replace

from supervisor.states import ProcessStates

from fcgi_toolkit import names, policy
from fcgi_toolkit.policy import (DumpStacks, HardStop, Hold, Kill, Limits, Memory, Promote, Recycle,
                                 SlotSnapshot, Snapshot, Start, Stop)
from fcgi_toolkit.sampler import Sampler
from fcgi_toolkit.scoreboard import SlotRecord

MB = 1024 * 1024
NOW = 1_000_000.0
RUNNING, STOPPED, STOPPING = ProcessStates.RUNNING, ProcessStates.STOPPED, ProcessStates.STOPPING


def record(index, pid, requests=0, inflight=0, req_start=0.0, req_id=0, method="GET", uri="/",
           ready=True, draining=False, baseline=0, standby=False):
    return SlotRecord(slot=index, pid=pid, started=NOW - 1000, requests=requests,
                      inflight=inflight, ready=ready, draining=draining, req_start=req_start,
                      req_id=req_id, last_duration=0.0, method=method, uri=uri,
                      baseline=baseline, standby=standby)


def worker(index, rss=10 * MB, requests=0, age=1000.0, max_requests=0, max_age=0.0,
           state=RUNNING, **rec):
    pid = 100 + index
    return SlotSnapshot(name="wiki_%02d" % index, index=index, state=state, pid=pid,
                        create_time=NOW - age, rss=rss,
                        record=record(index, pid, requests=requests, **rec), age=age,
                        max_requests=max_requests, max_age=max_age)


def stopped(index):
    return SlotSnapshot(name="wiki_%02d" % index, index=index, state=STOPPED)


def snap(*slots):
    return Snapshot(time=NOW, slots=tuple(slots))


LIMITS = Limits(count=2, standby=1, max_rss=256 * MB, max_concurrent=1, flap_window=60.0)


def test_nothing_to_do_when_every_worker_is_within_limits():
    s = snap(worker(0), worker(1), stopped(2))
    assert policy.decide(s, NOW, LIMITS, Memory()) == []


def test_rss_over_limit_recycles_with_a_readable_reason():
    s = snap(worker(0, rss=301 * MB), worker(1), stopped(2))
    [action] = policy.decide(s, NOW, LIMITS, Memory())
    assert action == Recycle("wiki_00", 100, "rss 301MB > 256MB", "rss", 301 / 256, False,
                             replacement="wiki_02")


def test_worst_offender_first_and_concurrency_cap():
    limits = Limits(count=3, standby=2, max_rss=100 * MB, max_concurrent=1)
    s = snap(worker(0, rss=120 * MB), worker(1, rss=300 * MB), worker(2, rss=150 * MB),
             stopped(3), stopped(4))
    actions = policy.decide(s, NOW, limits, Memory())
    assert [a.slot for a in actions] == ["wiki_01"]
    # With room for two, the two worst in order.
    limits2 = Limits(count=3, standby=2, max_rss=100 * MB, max_concurrent=2)
    assert [a.slot for a in policy.decide(s, NOW, limits2, Memory())] == ["wiki_01", "wiki_02"]
    # One recycle already in progress uses the only room.
    busy = Memory(busy=frozenset({"wiki_00", "wiki_03"}), operations=1)
    assert policy.decide(s, NOW, limits, busy) == []


def test_recycles_need_a_free_standby_slot_not_backing_off():
    limits = Limits(count=2, standby=1, max_rss=100 * MB, max_concurrent=2)
    s = snap(worker(0, rss=200 * MB), worker(1, rss=300 * MB), stopped(2))
    assert [a.slot for a in policy.decide(s, NOW, limits, Memory())] == ["wiki_01"]
    backing_off = Memory(backoff_until={"wiki_02": NOW + 5})
    assert policy.decide(s, NOW, limits, backing_off) == []
    # A STOPPING slot is no standby.
    s2 = snap(worker(0, rss=200 * MB), worker(1), SlotSnapshot("wiki_02", 2, STOPPING, pid=7))
    assert policy.decide(s2, NOW, limits, Memory()) == []


def test_without_standby_capacity_drops_by_at_most_max_concurrent_and_never_to_zero():
    limits = Limits(count=3, standby=0, max_rss=100 * MB, max_concurrent=5)
    s = snap(worker(0, rss=200 * MB), worker(1, rss=300 * MB), worker(2, rss=250 * MB))
    # Three offenders, three ready: at most two stop so one stays ready.
    assert [a.slot for a in policy.decide(s, NOW, limits, Memory())] == ["wiki_01", "wiki_02"]
    one = Limits(count=1, standby=0, max_rss=100 * MB)
    assert policy.decide(snap(worker(0, rss=200 * MB)), NOW, one, Memory()) == []


def test_one_action_per_worker_per_pass():
    limits = Limits(count=2, standby=1, max_rss=100 * MB, request_timeout=60, slow_request=10,
                    max_concurrent=2)
    # Over rss AND stuck past request_timeout AND slow: only the kill.
    s = snap(worker(0, rss=300 * MB, inflight=1, req_start=NOW - 61, req_id=4, uri="/x"),
             worker(1), stopped(2))
    actions = policy.decide(s, NOW, limits, Memory())
    assert actions == [Kill("wiki_00", 100, "request_timeout GET /x running 1m01s")]


def test_request_timeout_kill_once_per_pid():
    limits = Limits(count=2, standby=1, request_timeout=30)
    s = snap(worker(0, inflight=1, req_start=NOW - 31, req_id=1), worker(1), stopped(2))
    assert [type(a) for a in policy.decide(s, NOW, limits, Memory())] == [Kill]
    assert policy.decide(s, NOW, limits, Memory(killed=frozenset({100}))) == []


def test_slow_request_dumps_stacks_once_per_request():
    limits = Limits(count=2, standby=1, slow_request=10)
    s = snap(worker(0, inflight=1, req_start=NOW - 12, req_id=7, uri="/slow"), worker(1))
    [dump] = policy.decide(s, NOW, limits, Memory())
    assert dump == DumpStacks("wiki_00", 100, 7, "slow_request GET /slow running 12s")
    assert policy.decide(s, NOW, limits, Memory(dumped={"wiki_00": (100, 7)})) == []
    # The next slow request of the same worker is dumped again.
    s2 = snap(worker(0, inflight=1, req_start=NOW - 12, req_id=8), worker(1))
    assert len(policy.decide(s2, NOW, limits, Memory(dumped={"wiki_00": (100, 7)}))) == 1


def test_recycle_wins_over_dump_but_a_capped_offender_still_gets_its_dump():
    limits = Limits(count=2, standby=1, max_rss=100 * MB, slow_request=5)
    s = snap(worker(0, rss=300 * MB, inflight=1, req_start=NOW - 6, req_id=1),
             worker(1, rss=200 * MB, inflight=1, req_start=NOW - 6, req_id=1), stopped(2))
    actions = policy.decide(s, NOW, limits, Memory())
    assert [(type(a), a.slot) for a in actions] == [(Recycle, "wiki_00"), (DumpStacks, "wiki_01")]


def test_requests_and_age_limits_use_the_values_drawn_for_this_life():
    limits = Limits(count=1, standby=1, max_requests=1000, max_age=6 * 3600)
    s = snap(worker(0, requests=1043, max_requests=1021), stopped(1))
    [a] = policy.decide(s, NOW, limits, Memory())
    assert a.reason == "requests 1043 >= 1021" and a.kind == "requests"
    s = snap(worker(0, requests=1020, max_requests=1021), stopped(1))
    assert policy.decide(s, NOW, limits, Memory()) == []
    s = snap(worker(0, age=6 * 3600 + 125, max_age=6 * 3600 + 30), stopped(1))
    [a] = policy.decide(s, NOW, limits, Memory())
    assert a.reason == "age 6h02m >= 6h" and a.kind == "age"


def test_draining_busy_or_untrusted_workers_are_not_recycled():
    limits = Limits(count=2, standby=1, max_rss=100 * MB)
    draining = worker(0, rss=300 * MB, draining=True)
    untrusted = SlotSnapshot("wiki_01", 1, RUNNING, pid=101, rss=300 * MB, record=None)
    assert policy.decide(snap(draining, untrusted, stopped(2)), NOW, limits, Memory()) == []
    s = snap(worker(0, rss=300 * MB), worker(1), stopped(2))
    assert policy.decide(s, NOW, limits, Memory(busy=frozenset({"wiki_00"}))) == []


def test_flapping_worker_recycles_flagged_then_holds_while_backing_off():
    # No published baseline (no procfs): the age at the breach decides.
    limits = Limits(count=2, standby=1, max_rss=100 * MB, flap_window=60)
    young = worker(0, rss=150 * MB, age=3.0)
    s = snap(young, worker(1), stopped(2))
    [a] = policy.decide(s, NOW, limits, Memory())
    assert isinstance(a, Recycle) and a.flapping
    held = policy.decide(s, NOW, limits, Memory(backoff_until={"wiki_00": NOW + 8}))
    assert held == [Hold("wiki_00", 100, "rss 150MB > 100MB", "rss", NOW + 8)]
    # The breach time counts, not today's age: a worker over the limit since it was 3 s old
    # is still flapping when it is 100 s old.
    older = worker(0, rss=150 * MB, age=100.0)
    mem = Memory(first_breach={100: NOW - 97}, backoff_until={"wiki_00": NOW + 8})
    assert isinstance(policy.decide(snap(older, worker(1), stopped(2)), NOW, limits, mem)[0], Hold)
    # Breached late in life: a normal recycle even while the slot backs off.
    late = Memory(first_breach={100: NOW - 1}, backoff_until={"wiki_00": NOW + 8})
    [a] = policy.decide(snap(older, worker(1), stopped(2)), NOW, limits, late)
    assert isinstance(a, Recycle) and not a.flapping


def test_young_worker_that_grew_past_the_limit_is_replaced_even_while_backing_off():
    # Started at 25 MB, 80 MB after a few seconds of work: a replacement starts small again.
    limits = Limits(count=2, standby=1, max_rss=80 * MB, flap_window=60)
    young = worker(0, rss=90 * MB, age=3.0, baseline=25 * MB)
    mem = Memory(backoff_until={"wiki_00": NOW + 30})
    [a] = policy.decide(snap(young, worker(1), stopped(2)), NOW, limits, mem)
    assert a == Recycle("wiki_00", 100, "rss 90MB > 80MB", "rss", 90 / 80, False,
                        replacement="wiki_02")


def test_worker_over_the_limit_at_its_start_is_flapping_however_old():
    limits = Limits(count=2, standby=1, max_rss=80 * MB, flap_window=60)
    fat = worker(0, rss=90 * MB, age=500.0, baseline=85 * MB)
    [a] = policy.decide(snap(fat, worker(1), stopped(2)), NOW, limits, Memory())
    assert isinstance(a, Recycle) and a.flapping
    held = policy.decide(snap(fat, worker(1), stopped(2)), NOW, limits,
                         Memory(backoff_until={"wiki_00": NOW + 8}))
    assert held == [Hold("wiki_00", 100, "rss 90MB > 80MB", "rss", NOW + 8)]
    # At the limit exactly is not over it.
    edge = worker(0, rss=90 * MB, age=3.0, baseline=80 * MB)
    assert not policy.flapping(edge, "rss", limits, 3.0)


def test_flapping_by_age_and_never_by_requests():
    limits = Limits(count=2, standby=1, max_rss=80 * MB, flap_window=60)
    w = worker(0, baseline=10 * MB)
    assert policy.flapping(w, "age", limits, 30.0)           # max_age shorter than the window
    assert not policy.flapping(w, "age", limits, 90.0)
    assert not policy.flapping(w, "requests", limits, 1.0)


def test_hard_ceiling_stops_at_once_even_in_a_recycle_waiting_for_its_replacement():
    limits = Limits(count=2, standby=1, max_rss=80 * MB, max_rss_hard=120 * MB)
    s = snap(worker(0, rss=130 * MB, baseline=20 * MB), worker(1),
             SlotSnapshot("wiki_02", 2, ProcessStates.STARTING, pid=7))
    mem = Memory(busy=frozenset({"wiki_00", "wiki_02"}), operations=1)
    assert policy.decide(s, NOW, limits, mem) == [
        HardStop("wiki_00", 100, "rss 130MB > 120MB (limits.max_rss_hard)")]
    # Below the ceiling the recycle in progress just goes on.
    s2 = snap(worker(0, rss=110 * MB, baseline=20 * MB), worker(1), s.slots[2])
    assert policy.decide(s2, NOW, limits, mem) == []
    # Off by default.
    assert policy.decide(s, NOW, replace(limits, max_rss_hard=0), mem) == []


def test_hard_ceiling_never_stops_the_last_ready_worker():
    limits = Limits(count=1, standby=1, max_rss=80 * MB, max_rss_hard=120 * MB)
    alone = snap(worker(0, rss=300 * MB), SlotSnapshot("wiki_01", 1, ProcessStates.STARTING,
                                                       pid=7))
    mem = Memory(busy=frozenset({"wiki_00", "wiki_01"}), operations=1)
    assert policy.hard_stops(alone, limits, mem) == []
    # Two over the ceiling and no one else: the worse one stops, the other keeps serving.
    two = Limits(count=2, standby=1, max_rss=80 * MB, max_rss_hard=120 * MB)
    both = snap(worker(0, rss=200 * MB), worker(1, rss=300 * MB), stopped(2))
    assert [h.slot for h in policy.hard_stops(both, two, Memory())] == ["wiki_01"]
    # A draining or stopping worker is already on its way out.
    going = snap(worker(0, rss=300 * MB, draining=True), worker(1))
    assert policy.hard_stops(going, two, Memory()) == []


def test_hard_stop_and_kill_never_both_for_one_worker():
    limits = Limits(count=2, standby=1, max_rss=80 * MB, max_rss_hard=120 * MB,
                    request_timeout=10.0)
    stuck = worker(0, rss=300 * MB, inflight=1, req_start=NOW - 60, req_id=3)
    actions = policy.decide(snap(stuck, worker(1), stopped(2)), NOW, limits, Memory())
    assert [type(a) for a in actions] == [HardStop]


def test_request_count_reached_quickly_is_not_flapping():
    limits = Limits(count=2, standby=1, max_requests=50, flap_window=60)
    s = snap(worker(0, requests=60, max_requests=50, age=2.0), worker(1), stopped(2))
    [a] = policy.decide(s, NOW, limits, Memory(backoff_until={"wiki_00": NOW + 10}))
    assert isinstance(a, Recycle) and not a.flapping


def test_backoff_is_exponential_and_capped():
    delays = [policy.backoff_delay(n) for n in range(1, 6)]
    assert delays == [2.0, 4.0, 8.0, 16.0, 32.0]
    assert policy.backoff_delay(100) == policy.BACKOFF_MAX
    assert policy.backoff_delay(0) == 0.0


def test_reconcile_starts_lowest_free_slots_skipping_backoff_and_stopping():
    limits = Limits(count=2, standby=2)
    s = snap(stopped(0), SlotSnapshot("wiki_01", 1, STOPPING, pid=5), stopped(2), stopped(3))
    assert policy.reconcile(s, NOW, limits, Memory()) == [
        Start("wiki_00", "0 of 2 workers active"), Start("wiki_02", "0 of 2 workers active")]
    mem = Memory(backoff_until={"wiki_00": NOW + 1})
    assert [a.slot for a in policy.reconcile(s, NOW, limits, mem)] == ["wiki_02", "wiki_03"]


def test_reconcile_stops_extra_highest_first_and_waits_for_operations():
    limits = Limits(count=1, standby=2)
    s = snap(worker(0), worker(1), worker(2))
    assert policy.reconcile(s, NOW, limits, Memory()) == [
        Stop("wiki_02", "3 of 1 workers active"), Stop("wiki_01", "3 of 1 workers active")]
    assert policy.reconcile(s, NOW, limits, Memory(operations=1)) == []
    assert policy.reconcile(snap(worker(0), stopped(1)), NOW, limits, Memory()) == []


def test_formatting():
    assert names.format_size(301 * MB) == "301MB"
    assert names.format_size(int(80.5 * MB)) == "80.5MB"
    assert names.format_duration(45) == "45s"
    assert names.format_duration(185) == "3m05s"
    assert names.format_duration(6 * 3600) == "6h"
    assert names.format_duration(6 * 3600 + 125) == "6h02m"


class _Proc:
    def __init__(self, pid):
        self.pid = pid

    def is_running(self):
        return True

    def create_time(self):
        return NOW - 10 - self.pid

    def memory_info(self):
        class M:
            rss = 5 * MB
        return M()


class _Board:
    def read(self, index):
        return None


def test_sampler_draws_jitter_once_per_life():
    limits = Limits(count=2, standby=1, max_requests=1000, max_requests_jitter=100,
                    max_age=3600)
    sampler = Sampler("wiki", ["wiki_00", "wiki_01", "wiki_02"], _Board(), limits,
                      rng=random.Random(4), clock=lambda: NOW, process_factory=_Proc)
    infos = [{"name": "wiki_00", "group": "wiki", "state": RUNNING, "pid": 11},
             {"name": "wiki_01", "group": "wiki", "state": RUNNING, "pid": 12},
             {"name": "wiki_02", "group": "wiki", "state": STOPPED, "pid": 0},
             {"name": "other", "group": "other", "state": RUNNING, "pid": 13}]
    first = sampler.sample(infos)
    again = sampler.sample(infos)
    assert [s.name for s in first.slots] == ["wiki_00", "wiki_01", "wiki_02"]
    for a, b in zip(first.slots, again.slots):
        assert (a.max_requests, a.max_age) == (b.max_requests, b.max_age)
    w0 = first.slots[0]
    assert 1000 <= w0.max_requests <= 1100 and 3600 <= w0.max_age <= 3960
    assert w0.rss == 5 * MB and w0.age == 21 and w0.record is None
    # A new life (new pid) draws again; the dead life is forgotten.
    infos[0] = dict(infos[0], pid=21)
    sampler.sample(infos)
    assert {k[0] for k in sampler.lives} == {21, 12}


# --------------------------------------------------------------------------
# Published RSS (the worker's own value in its scoreboard slot)
# --------------------------------------------------------------------------

def published(slot, rss, rss_time, **kw):
    """``slot`` with its record carrying a published RSS."""
    values = dict(slot.record.__dict__, rss=rss, rss_time=rss_time)
    values.update(kw)
    return SlotSnapshot(**dict(slot.__dict__, record=SlotRecord(**values)))


def test_the_newer_of_sample_and_publication_decides():
    sampled = SlotSnapshot(**dict(worker(0, rss=100 * MB).__dict__, rss_time=NOW - 1))
    newer = published(sampled, 300 * MB, NOW - 0.5)
    older = published(sampled, 300 * MB, NOW - 2)
    assert newer.latest_rss == 300 * MB and older.latest_rss == 100 * MB
    assert policy.decide(snap(newer, worker(1), stopped(2)), NOW, LIMITS, Memory()) == [
        Recycle("wiki_00", 100, "rss 300MB > 256MB", "rss", 300 / 256, replacement="wiki_02")]
    assert policy.decide(snap(older, worker(1), stopped(2)), NOW, LIMITS, Memory()) == []
    # A worker whose sample failed (rss 0, no time) is judged by what it published.
    unsampled = published(worker(0, rss=0), 300 * MB, NOW - 5)
    assert policy.breaches(unsampled, LIMITS)[0][1] == "rss"


def alarm_case(slot, records=None, limits=LIMITS, memory=Memory()):
    last = snap(slot, worker(1), stopped(2))
    records = records if records is not None else {s.name: s.record for s in last.slots}
    return policy.rss_alarms(last, records, limits, memory)


def test_rss_alarm_for_a_live_worker_over_the_limit_once_per_publication():
    over = published(worker(0), 300 * MB, NOW - 0.01)
    assert alarm_case(over) == [policy.RssAlarm("wiki_00", 100, 300 * MB, NOW - 0.01)]
    seen = Memory(alarmed={"wiki_00": (100, NOW - 0.01)})
    assert alarm_case(over, memory=seen) == []
    # A later publication alarms again.
    later = published(worker(0), 310 * MB, NOW)
    assert [a.slot for a in alarm_case(later, memory=seen)] == ["wiki_00"]


def test_no_rss_alarm_when_the_timer_passes_already_handle_it_or_it_is_not_trusted():
    over = published(worker(0), 300 * MB, NOW)
    assert alarm_case(published(worker(0), 200 * MB, NOW)) == []                 # under
    assert alarm_case(over, limits=Limits(count=2, standby=1)) == []             # max_rss off
    assert alarm_case(over, memory=Memory(busy=frozenset({"wiki_00"}))) == []    # in a recycle
    assert alarm_case(over, memory=Memory(first_breach={100: NOW - 3})) == []    # seen, held
    assert alarm_case(published(worker(0), 300 * MB, NOW, draining=True)) == []
    assert alarm_case(SlotSnapshot(**dict(over.__dict__, state=STOPPING))) == []
    # A record left by another process (a dead worker, a reused pid) is not this worker's.
    stale = SlotRecord(**dict(over.record.__dict__, pid=999))
    assert alarm_case(over, records={"wiki_00": stale}) == []
    reused = SlotRecord(**dict(over.record.__dict__, started=NOW - 5))
    assert alarm_case(over, records={"wiki_00": reused}) == []
    assert alarm_case(over, records={}) == []


# -- the capacity guard: one place, the action names its replacement ------------

def test_two_recycles_at_once_get_distinct_standby_slots_lowest_first():
    limits = Limits(count=2, standby=2, max_rss=256 * MB, max_concurrent=2)
    s = snap(worker(0, rss=300 * MB), worker(1, rss=400 * MB), stopped(3), stopped(2))
    actions = policy.decide(s, NOW, limits, Memory())
    assert [(a.slot, a.replacement) for a in actions] == [("wiki_01", "wiki_02"),
                                                          ("wiki_00", "wiki_03")]


def test_capacity_says_why_no_recycle_may_begin():
    s = snap(worker(0), worker(1), stopped(2))
    assert policy.capacity(s, NOW, LIMITS, Memory()) == policy.Room(1, ("wiki_02",))
    busy = Memory(busy=frozenset({"wiki_00", "wiki_02"}), operations=1)
    assert "recycle.max_concurrent = 1" in policy.capacity(s, NOW, LIMITS, busy).why
    backing_off = Memory(backoff_until={"wiki_02": NOW + 5})
    assert policy.capacity(s, NOW, LIMITS, backing_off).why.startswith("no standby slot is free")
    no_standby = Limits(count=2, standby=0, max_concurrent=1)
    assert policy.capacity(snap(worker(0), worker(1)), NOW, no_standby, Memory()).recycles == 1
    alone = policy.capacity(snap(worker(0)), NOW, no_standby, Memory(), offender="wiki_00")
    assert alone.recycles == 0 and "no other worker is ready" in alone.why


def test_admit_answers_operator_and_reload_steps_with_the_same_guard():
    s = snap(worker(0), worker(1), stopped(2))
    assert policy.admit(s, NOW, LIMITS, Memory(), "wiki_01", "operator request",
                        "operator") == Recycle("wiki_01", 101, "operator request", "operator",
                                               1.0, replacement="wiki_02")
    waiting = policy.admit(s, NOW, LIMITS, Memory(operations=1, busy=frozenset({"wiki_00"})),
                           "wiki_01", "reload", "reload")
    assert isinstance(waiting, policy.Wait) and "already in progress" in waiting.why
    no_standby = Limits(count=2, standby=0, max_concurrent=1)
    assert policy.admit(snap(worker(0), worker(1)), NOW, no_standby, Memory(), "wiki_00",
                        "reload", "reload").replacement is None


def test_a_reload_needs_a_standby_or_a_second_worker():
    assert policy.reload_refusal(Limits(count=1, standby=0)).startswith("a rolling reload needs")
    assert policy.reload_refusal(Limits(count=1, standby=1)) is None
    assert policy.reload_refusal(Limits(count=2, standby=0)) is None


# -- warm standby ------------------------------------------------------------------

WARM = replace(LIMITS, warm=True)


def standby(index, state=RUNNING, **kw):
    return worker(index, state=state, ready=False, standby=True, **kw)


def test_warm_recycle_promotes_the_warm_standby_instead_of_starting_a_slot():
    s = snap(worker(0, rss=301 * MB), worker(1), standby(2))
    [action] = policy.decide(s, NOW, WARM, Memory())
    assert action == Recycle("wiki_00", 100, "rss 301MB > 256MB", "rss", 301 / 256, False,
                             replacement="wiki_02", warm=True)


def test_warm_recycle_waits_without_a_warm_standby():
    for third in (stopped(2), worker(2, state=ProcessStates.STARTING, ready=False),
                  standby(2, draining=True)):
        s = snap(worker(0, rss=301 * MB), worker(1), third)
        assert policy.decide(s, NOW, WARM, Memory()) == []
        room = policy.capacity(s, NOW, WARM, Memory())
        assert room.recycles == 0 and "warm standby" in room.why


def test_warm_standby_still_starting_takes_over_only_while_two_others_are_ready():
    s = snap(worker(0, rss=301 * MB), worker(1), standby(2, state=ProcessStates.STARTING))
    assert policy.capacity(s, NOW, WARM, Memory()).standby == ("wiki_02",)
    lone = replace(WARM, count=1)
    s1 = snap(worker(0, rss=301 * MB), standby(1, state=ProcessStates.STARTING))
    assert policy.capacity(s1, NOW, lone, Memory()).recycles == 0


def test_warm_standby_is_never_judged_nor_hard_stopped_nor_alarmed():
    limits = replace(WARM, max_rss_hard=400 * MB, max_age=10.0)
    s = snap(worker(0), worker(1), standby(2, rss=500 * MB, age=1000.0))
    assert policy.decide(s, NOW, limits, Memory()) == []
    rec = replace(s.slots[2].record, rss=500 * MB, rss_time=NOW)
    assert policy.rss_alarms(s, {"wiki_02": rec}, limits, Memory()) == []


def test_warm_standby_is_not_its_own_replacement():
    s = snap(worker(0), worker(1), standby(2))
    assert isinstance(policy.admit(s, NOW, WARM, Memory(), "wiki_02", "x", "operator"),
                      policy.Wait)


def test_warm_reconcile_runs_count_plus_standby_and_promotes_count():
    s = snap(stopped(0), stopped(1), stopped(2))
    assert policy.reconcile(s, NOW, WARM, Memory()) == [
        Start("wiki_00", "0 of 3 workers active"), Start("wiki_01", "0 of 3 workers active"),
        Start("wiki_02", "0 of 3 workers active")]
    s = snap(standby(0), standby(1), standby(2))
    assert policy.reconcile(s, NOW, WARM, Memory()) == [
        Promote("wiki_00", 100, "0 of 2 workers serving"),
        Promote("wiki_01", 101, "0 of 2 workers serving")]
    assert policy.reconcile(snap(worker(0), worker(1), standby(2)), NOW, WARM, Memory()) == []


def test_warm_reconcile_after_a_recycle_starts_the_offenders_slot_as_the_next_standby():
    s = snap(stopped(0), worker(1), worker(2))
    assert policy.reconcile(s, NOW, WARM, Memory()) == [Start("wiki_00", "2 of 3 workers active")]
    backing_off = Memory(backoff_until={"wiki_00": NOW + 5})
    assert policy.reconcile(s, NOW, WARM, backing_off) == []


def test_warm_reconcile_stops_extra_serving_workers_then_extra_standbys():
    lower = replace(WARM, count=1)
    s = snap(worker(0), worker(1), standby(2))
    assert policy.reconcile(s, NOW, lower, Memory()) == [Stop("wiki_01", "2 of 1 workers serving")]
    s = snap(worker(0), standby(1), standby(2))
    assert policy.reconcile(s, NOW, lower, Memory()) == [Stop("wiki_02", "3 of 2 workers active")]


def test_cold_standby_reconcile_is_unchanged():
    s = snap(worker(0), worker(1), stopped(2))
    assert LIMITS.running_slots == 2 and policy.reconcile(s, NOW, LIMITS, Memory()) == []


def test_limits_are_warm_only_with_standby_slots():
    from fcgi_toolkit import settings
    base = {"app": {"name": "wiki", "wsgi": "app:application"}}
    dep = settings.parse(base, "/x/deploy.toml")
    assert dep.workers.warm_standby is True and Limits.from_deployment(dep).warm
    dep = settings.parse({**base, "workers": {"standby": 0}}, "/x/deploy.toml")
    assert not Limits.from_deployment(dep).warm
