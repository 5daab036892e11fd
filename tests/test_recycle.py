"""The recycle state machine (fcgi_toolkit.recycle): pure, plain values, no fakes.

Every transition of :data:`recycle.TRANSITIONS` is taken by a case below
(the last test checks it), every failure path ends FAILED with the new
worker stopped, and an operation saved in any phase comes back from the
state file equal and advances the same way (a listener restarted there).
"""
from __future__ import annotations

import json
from dataclasses import replace

import pytest
from supervisor.states import ProcessStates as PS

from fcgi_toolkit import recycle, statefile
from fcgi_toolkit.policy import SlotSnapshot, Snapshot
from fcgi_toolkit.recycle import (Failure, Operation, Phase, Reload, StartProcess, StopProcess,
                                  advance, begin, fail)
from fcgi_toolkit.scoreboard import SlotRecord

NOW = 1_000_000.0
TIMEOUT = 10.0          # recycle.ready_timeout
OLD_PID, NEW_PID = 100, 200

TAKEN: set = set()      # transitions the cases took (checked by the last test)


def record(index, pid, ready=True):
    return SlotRecord(slot=index, pid=pid, started=NOW - 50, requests=0, inflight=0, ready=ready,
                      draining=False, req_start=0.0, req_id=0, last_duration=0.0, method="",
                      uri="")


def slot(index, state, pid=0, ready=True, description=""):
    """Slot ``index`` in ``state``; a RUNNING one has its own live scoreboard record."""
    rec = record(index, pid, ready) if state == PS.RUNNING and pid else None
    return SlotSnapshot(name="wiki_%02d" % index, index=index, state=state, pid=pid,
                        create_time=NOW - 50 if pid else None, record=rec,
                        description=description)


def snap(*slots):
    return Snapshot(time=NOW, slots=tuple(slots))


def op(phase, replacement="wiki_02", start_issued=NOW, **kw):
    values = dict(offender="wiki_00", replacement=replacement, phase=phase, old_pid=OLD_PID,
                  reason="rss 150MB > 100MB", kind="rss", origin="watchdog", began=NOW - 1,
                  start_issued=start_issued)
    values.update(kw)
    return Operation(**values)


def step(operation, snapshot, now=NOW + 1):
    after, effects = advance(operation, snapshot, now, TIMEOUT)
    if after.phase != operation.phase:
        TAKEN.add((operation.phase, after.phase))
    return after, effects


OFFENDER_UP = slot(0, PS.RUNNING, OLD_PID)
OFFENDER_STOPPING = slot(0, PS.STOPPING, OLD_PID)
OFFENDER_STOPPED = slot(0, PS.STOPPED)


# -- begin ---------------------------------------------------------------------

def test_begin_with_a_standby_slot_starts_it_first():
    new, effects = begin(OFFENDER_UP, "wiki_00", "wiki_02", "rss", "rss", "watchdog", NOW)
    assert new.phase == Phase.STARTING and new.old_pid == OLD_PID and new.new_slot == "wiki_02"
    assert effects == [StartProcess("wiki_02")]


def test_begin_without_standby_stops_the_offender_first():
    new, effects = begin(OFFENDER_UP, "wiki_00", None, "operator request", "operator",
                         "operator", NOW, request="r1")
    assert new.phase == Phase.STOPPING_FIRST and new.new_slot == "wiki_00"
    assert new.request == "r1" and effects == [StopProcess("wiki_00")]


# -- STARTING --------------------------------------------------------------------

def test_starting_waits_while_the_replacement_starts():
    current = op(Phase.STARTING)
    assert step(current, snap(OFFENDER_UP, slot(2, PS.STARTING, NEW_PID))) == (current, [])
    # RUNNING but its scoreboard does not say ready yet: still waiting.
    assert step(current, snap(OFFENDER_UP, slot(2, PS.RUNNING, NEW_PID, ready=False))) == (
        current, [])


def test_starting_ready_replacement_stops_the_offender():
    new, effects = step(op(Phase.STARTING), snap(OFFENDER_UP, slot(2, PS.RUNNING, NEW_PID)))
    assert new.phase == Phase.STOPPING and new.new_pid == NEW_PID and new.took == 1.0
    assert effects == [StopProcess("wiki_00")]


def starting_ready(index, pid):
    """A worker supervisord still calls STARTING whose own scoreboard slot says ready."""
    return SlotSnapshot(name="wiki_%02d" % index, index=index, state=PS.STARTING, pid=pid,
                        create_time=NOW - 0.3, record=record(index, pid, True))


def test_starting_replacement_ready_in_its_slot_counts_while_another_worker_serves():
    other = slot(1, PS.RUNNING, 101)
    busy = {"wiki_00", "wiki_02"}
    world = snap(OFFENDER_UP, other, starting_ready(2, NEW_PID))
    new, effects = advance(op(Phase.STARTING), world, NOW + 0.3, TIMEOUT, busy)
    assert new.phase == Phase.STOPPING and new.new_pid == NEW_PID
    assert new.took == pytest.approx(0.3)
    assert effects == [StopProcess("wiki_00")]
    # Without ``busy`` (the caller did not say) it waits for RUNNING, as before.
    assert advance(op(Phase.STARTING), world, NOW + 0.3, TIMEOUT) == (op(Phase.STARTING), [])


def test_starting_replacement_ready_in_its_slot_waits_for_running_when_it_would_hold_alone():
    # Only the offender serves besides it: if the replacement died within startsecs
    # after the offender stopped, no process would hold the socket.  Wait for RUNNING.
    busy = {"wiki_00", "wiki_02"}
    alone = snap(OFFENDER_UP, starting_ready(2, NEW_PID))
    assert advance(op(Phase.STARTING), alone, NOW + 0.3, TIMEOUT, busy) == (
        op(Phase.STARTING), [])
    # The only other ready worker is itself in a recycle: it may be stopping soon.
    other_busy = snap(OFFENDER_UP, slot(1, PS.RUNNING, 101), starting_ready(2, NEW_PID))
    assert advance(op(Phase.STARTING), other_busy, NOW + 0.3, TIMEOUT,
                   busy | {"wiki_01"}) == (op(Phase.STARTING), [])
    # Not ready in its slot: still starting.
    not_ready = replace(starting_ready(2, NEW_PID), record=record(2, NEW_PID, False))
    assert advance(op(Phase.STARTING), snap(OFFENDER_UP, slot(1, PS.RUNNING, 101), not_ready),
                   NOW + 0.3, TIMEOUT, busy) == (op(Phase.STARTING), [])


def test_replacement_counted_early_that_dies_leaves_the_recycle_done_when_the_offender_is_gone():
    # STOPPING: the replacement exited within startsecs (BACKOFF); the offender is
    # still draining.  The recycle waits for the offender, then ends; reconcile and
    # supervisord's own retries bring the count back, the other worker serves meanwhile.
    stopping = op(Phase.STOPPING, new_pid=NEW_PID, took=0.3)
    draining = slot(0, PS.STOPPING, OLD_PID)
    world = snap(draining, slot(1, PS.RUNNING, 101), slot(2, PS.BACKOFF))
    assert advance(stopping, world, NOW + 1, TIMEOUT, {"wiki_00", "wiki_02"}) == (stopping, [])
    gone = snap(slot(0, PS.STOPPED), slot(1, PS.RUNNING, 101), slot(2, PS.BACKOFF))
    assert advance(stopping, gone, NOW + 2, TIMEOUT)[0].phase == Phase.DONE


def test_starting_offender_exited_by_itself_finishes_when_the_replacement_is_ready():
    # The offender died (supervisord restarts it: a new pid) while its replacement started.
    restarted = slot(0, PS.STARTING, 333)
    new, effects = step(op(Phase.STARTING), snap(restarted, slot(2, PS.RUNNING, NEW_PID)))
    assert new.phase == Phase.DONE and effects == []
    new, effects = step(op(Phase.STARTING), snap(slot(0, PS.EXITED), slot(2, PS.RUNNING, NEW_PID)))
    assert new.phase == Phase.DONE and effects == []


@pytest.mark.parametrize("state", [PS.BACKOFF, PS.FATAL, PS.EXITED])
def test_starting_replacement_that_fails_to_start_fails_and_is_stopped(state):
    failed = slot(2, state, description="Exited too quickly")
    new, effects = step(op(Phase.STARTING), snap(OFFENDER_UP, failed))
    assert new.phase == Phase.FAILED and effects == [StopProcess("wiki_02")]
    assert new.failure == Failure("wiki_02 %s" % failed.statename, "wiki_02",
                                  "Exited too quickly", Phase.STARTING)


def test_starting_replacement_not_ready_in_time_fails():
    current = op(Phase.STARTING)
    starting = snap(OFFENDER_UP, slot(2, PS.RUNNING, NEW_PID, ready=False))
    assert step(current, starting, now=NOW + TIMEOUT) == (current, [])   # at the limit: waits
    new, effects = step(current, starting, now=NOW + TIMEOUT + 0.5)
    assert new.phase == Phase.FAILED and effects == [StopProcess("wiki_02")]
    assert new.failure.why == "wiki_02 not ready within 10s (recycle.ready_timeout)"
    assert new.failure.log_of == "wiki_02"


def test_starting_replacement_that_is_not_a_process_fails():
    new, effects = step(op(Phase.STARTING), snap(OFFENDER_UP))
    assert new.phase == Phase.FAILED and new.failure.why == "wiki_02 is not a process of the group"
    assert effects == [StopProcess("wiki_02")]


def test_starting_lost_start_is_issued_again():
    current = op(Phase.STARTING)
    assert step(current, snap(OFFENDER_UP, slot(2, PS.STOPPED))) == (
        current, [StartProcess("wiki_02")])


# -- STOPPING --------------------------------------------------------------------

@pytest.mark.parametrize("offender", [None, OFFENDER_STOPPED, slot(0, PS.EXITED),
                                      slot(0, PS.STARTING, 333)],
                         ids=["not listed", "stopped", "exited", "restarted: new pid"])
def test_stopping_ends_when_the_offender_is_gone(offender):
    slots = (offender,) if offender else ()
    current = op(Phase.STOPPING, new_pid=NEW_PID, took=1.0)
    new, effects = step(current, snap(*slots, slot(2, PS.RUNNING, NEW_PID)))
    assert new.phase == Phase.DONE and effects == [] and new.new_pid == NEW_PID


def test_stopping_waits_for_the_drain_and_issues_a_lost_stop_again():
    current = op(Phase.STOPPING, new_pid=NEW_PID)
    assert step(current, snap(OFFENDER_STOPPING, slot(2, PS.RUNNING, NEW_PID))) == (current, [])
    assert step(current, snap(OFFENDER_UP, slot(2, PS.RUNNING, NEW_PID))) == (
        current, [StopProcess("wiki_00")])


# -- STOPPING_FIRST / RESTARTING (workers.standby = 0) -----------------------------

def test_stopping_first_restarts_the_slot_once_stopped():
    current = op(Phase.STOPPING_FIRST, replacement=None)
    assert step(current, snap(OFFENDER_STOPPING)) == (current, [])
    assert step(current, snap(OFFENDER_UP)) == (current, [StopProcess("wiki_00")])   # lost
    new, effects = step(current, snap(OFFENDER_STOPPED), now=NOW + 3)
    assert new.phase == Phase.RESTARTING and new.start_issued == NOW + 3
    assert effects == [StartProcess("wiki_00")]


def test_stopping_first_offender_exited_by_itself_restarts():
    new, effects = step(op(Phase.STOPPING_FIRST, replacement=None), snap(slot(0, PS.EXITED)))
    assert new.phase == Phase.RESTARTING and effects == [StartProcess("wiki_00")]


def test_restarting_ends_when_the_slot_is_ready():
    current = op(Phase.RESTARTING, replacement=None)
    assert step(current, snap(slot(0, PS.STARTING, NEW_PID))) == (current, [])
    assert step(current, snap(OFFENDER_STOPPED)) == (current, [StartProcess("wiki_00")])  # lost
    new, effects = step(current, snap(slot(0, PS.RUNNING, NEW_PID)))
    assert new.phase == Phase.DONE and new.new_pid == NEW_PID and effects == []


@pytest.mark.parametrize("state", [PS.BACKOFF, PS.FATAL, PS.EXITED])
def test_restarting_slot_that_fails_to_start_fails_and_is_stopped(state):
    new, effects = step(op(Phase.RESTARTING, replacement=None), snap(slot(0, state)))
    assert new.phase == Phase.FAILED and new.failure.phase == Phase.RESTARTING
    assert effects == [StopProcess("wiki_00")]


def test_restarting_not_ready_in_time_fails():
    starting = snap(slot(0, PS.STARTING, NEW_PID))
    new, effects = step(op(Phase.RESTARTING, replacement=None), starting, now=NOW + 11)
    assert new.phase == Phase.FAILED and effects == [StopProcess("wiki_00")]


# -- RPC faults --------------------------------------------------------------------

@pytest.mark.parametrize("phase,effects", [
    (Phase.STARTING, [StopProcess("wiki_02")]),     # the replacement is stopped again
    (Phase.RESTARTING, [StopProcess("wiki_00")]),
    (Phase.STOPPING, []),                           # the ready replacement keeps serving
    (Phase.STOPPING_FIRST, []),
])
def test_a_fault_fails_the_recycle_from_every_phase(phase, effects):
    current = op(phase, replacement=None if phase in (Phase.RESTARTING, Phase.STOPPING_FIRST)
                 else "wiki_02")
    new, done = fail(current, "startProcess: BAD_NAME wiki:wiki_02")
    TAKEN.add((phase, new.phase))
    assert new.phase == Phase.FAILED and done == effects
    assert new.failure == Failure("startProcess: BAD_NAME wiki:wiki_02", phase=phase)


def test_final_operations_do_not_move():
    finished = op(Phase.DONE)
    with pytest.raises(AssertionError):
        advance(finished, snap(OFFENDER_UP), NOW, TIMEOUT)
    with pytest.raises(AssertionError, match="no transition DONE -> FAILED"):
        fail(finished, "late fault")


# -- a listener restarted in each phase ---------------------------------------------

RESUMED = [
    (op(Phase.STARTING), snap(OFFENDER_UP, slot(2, PS.STOPPED))),          # start was lost
    (op(Phase.STARTING), snap(OFFENDER_UP, slot(2, PS.RUNNING, NEW_PID))),
    (op(Phase.STOPPING, new_pid=NEW_PID, took=0.5), snap(OFFENDER_UP, slot(2, PS.RUNNING,
                                                                         NEW_PID))),
    (op(Phase.STOPPING, new_pid=NEW_PID), snap(OFFENDER_STOPPED, slot(2, PS.RUNNING, NEW_PID))),
    (op(Phase.STOPPING_FIRST, replacement=None), snap(OFFENDER_STOPPED)),
    (op(Phase.RESTARTING, replacement=None), snap(slot(0, PS.RUNNING, NEW_PID))),
]


@pytest.mark.parametrize("saved,world", RESUMED, ids=lambda v: getattr(v, "phase", None) and
                         v.phase.value)
def test_the_state_file_round_trips_every_phase_and_advance_resumes_it(tmp_path, saved, world):
    state = statefile.State(recycle={saved.offender: saved},
                            reload=Reload("operator", {"wiki_00": OLD_PID}, NOW - 5, "r1"))
    path = str(tmp_path / "state.json")
    statefile.save_state(path, state)
    json.loads(open(path).read())                          # plain JSON on disk
    restored = statefile.load_state(path)                  # the restarted listener
    assert restored.recycle == {saved.offender: saved} and restored.reload == state.reload
    resumed = restored.recycle[saved.offender]
    assert step(resumed, world) == step(saved, world)


def test_the_old_state_file_layout_still_loads():
    """A file written before "took" existed (the pre-typed coordinator)."""
    data = {"version": 1, "slots": {"wiki_00": {"recycles": 2, "by_reason": {"rss": 2}}},
            "recycle": {"wiki_00": {"offender": "wiki_00", "replacement": "wiki_02",
                                    "phase": "starting", "old_pid": 100, "new_pid": 0,
                                    "reason": "operator request", "kind": "operator",
                                    "origin": "operator", "request": None, "flapping": False,
                                    "began": NOW, "start_issued": NOW},
                        "wiki_01": {"offender": "wiki_01", "phase": "no such phase"}},
            "reload": None, "flap_level": 1}
    state = statefile.State.from_json(data)
    assert list(state.recycle) == ["wiki_00"]              # the unreadable one is dropped
    assert state.recycle["wiki_00"].phase == Phase.STARTING
    assert state.slot("wiki_00").recycles == 2 and state.slot("wiki_09").recycles == 0
    assert state.to_json()["recycle"]["wiki_00"]["phase"] == "starting"


def test_reload_remaining_lists_the_old_workers_still_alive():
    reload = Reload("watch", {"wiki_00": OLD_PID, "wiki_01": 101}, NOW)
    world = snap(slot(1, PS.RUNNING, 101), slot(0, PS.RUNNING, 999), slot(2, PS.RUNNING, 102))
    assert [s.name for s in recycle.reload_remaining(reload, world)] == ["wiki_01"]


#: One world per transition (the cases above check each in detail).
SCENARIOS = [
    (op(Phase.STARTING), snap(OFFENDER_UP, slot(2, PS.RUNNING, NEW_PID))),
    (op(Phase.STARTING), snap(slot(0, PS.EXITED), slot(2, PS.RUNNING, NEW_PID))),
    (op(Phase.STARTING), snap(OFFENDER_UP, slot(2, PS.FATAL))),
    (op(Phase.STOPPING), snap(OFFENDER_STOPPED, slot(2, PS.RUNNING, NEW_PID))),
    (op(Phase.STOPPING), "fault"),
    (op(Phase.STOPPING_FIRST, replacement=None), snap(OFFENDER_STOPPED)),
    (op(Phase.STOPPING_FIRST, replacement=None), "fault"),
    (op(Phase.RESTARTING, replacement=None), snap(slot(0, PS.RUNNING, NEW_PID))),
    (op(Phase.RESTARTING, replacement=None), snap(slot(0, PS.BACKOFF))),
]


def test_every_transition_is_taken_and_no_other():
    taken = set()
    for before, world in SCENARIOS:
        after, _ = fail(before, "fault") if world == "fault" else step(before, world)
        taken.add((before.phase, after.phase))
    assert taken == recycle.TRANSITIONS
    assert TAKEN <= recycle.TRANSITIONS        # whatever the cases above took


# -- warm standby ------------------------------------------------------------------

def warm_slot(index, state=PS.RUNNING, pid=NEW_PID):
    rec = replace(record(index, pid, ready=False), standby=True)
    return SlotSnapshot(name="wiki_%02d" % index, index=index, state=state, pid=pid,
                        create_time=NOW - 50, record=rec)


def test_begin_warm_promotes_the_standby():
    operation, effects = recycle.begin(OFFENDER_UP, "wiki_00", "wiki_02", "rss", "rss", "watchdog",
                                       NOW, warm=True)
    assert operation.phase == Phase.STARTING and operation.warm
    assert effects == [recycle.PromoteProcess("wiki_02")]


def test_warm_promoted_standby_that_accepts_stops_the_offender_at_once():
    after, effects = step(op(Phase.STARTING, warm=True),
                          snap(OFFENDER_UP, slot(1, PS.RUNNING, 101), slot(2, PS.RUNNING, NEW_PID)),
                          now=NOW + 0.05)
    assert after.phase == Phase.STOPPING and after.new_pid == NEW_PID
    assert after.took == pytest.approx(0.05) and effects == [StopProcess("wiki_00")]


def test_warm_promotion_is_sent_again_only_after_a_while():
    s = snap(OFFENDER_UP, slot(1, PS.RUNNING, 101), warm_slot(2))
    assert step(op(Phase.STARTING, warm=True), s, now=NOW + 0.1)[1] == []
    after, effects = step(op(Phase.STARTING, warm=True), s, now=NOW + recycle.PROMOTE_AGAIN)
    assert after.phase == Phase.STARTING and effects == [recycle.PromoteProcess("wiki_02")]


def test_warm_standby_stopped_before_it_took_over_fails_the_recycle():
    after, effects = step(op(Phase.STARTING, warm=True),
                          snap(OFFENDER_UP, slot(1, PS.RUNNING, 101), slot(2, PS.STOPPED)))
    assert after.phase == Phase.FAILED and "warm standby wiki_02 stopped" in after.failure.why
    assert effects == [StopProcess("wiki_02")]


def test_warm_operation_survives_the_state_file():
    operation = op(Phase.STARTING, warm=True)
    assert Operation.from_json(json.loads(json.dumps(operation.to_json()))) == operation
