"""Warm standby with recording fakes and an injected clock (the coordinator,
the policy's reconcile and capacity guard, the recycle state machine).

The fake supervisord of test_listener brings a started worker up as a warm
standby (its record says standby, not ready) and turns it ready on SIGUSR2.
"""
from __future__ import annotations

import logging

from supervisor.states import ProcessStates as PS

from fcgi_toolkit import statefile
from test_listener import MB, World


def warm_world(tmp_path, **sections):
    sections.setdefault("workers", {})["warm_standby"] = True
    w = World(tmp_path, **sections)
    assert w.sup.warm
    w.sup.baseline = True       # as real workers do: their RSS when they became ready
    return w


def accepting(w):
    """Slots whose record says they accept (the ready capacity)."""
    return {w.sup.procs[n]["name"] for n, i in w.sup.index.items()
            if (rec := w.sup.board.get(i)) is not None and rec.ready and not rec.draining
            and w.sup.procs[n]["state"] in (PS.STARTING, PS.RUNNING)}


def warm(w):
    return {n for n, i in w.sup.index.items()
            if (rec := w.sup.board.get(i)) is not None and rec.standby}


def started_warm(w):
    w.passes(4)
    assert len(accepting(w)) == 2 and len(warm(w)) == 1, w.sup.board
    w.sup.calls.clear()


def test_warm_start_runs_every_slot_and_promotes_count_of_them(tmp_path):
    w = warm_world(tmp_path)
    w.co.run_pass()
    assert [c[1] for c in w.sup.named_calls("startProcess")] == [
        "wiki:wiki_00", "wiki:wiki_01", "wiki:wiki_02"]
    w.passes(3)
    assert accepting(w) == {"wiki_00", "wiki_01"} and warm(w) == {"wiki_02"}
    promoted = [c[1] for c in w.sup.named_calls("signalProcess") if c[2] == "USR2"]
    assert sorted(set(promoted)) == ["wiki:wiki_00", "wiki:wiki_01"]
    before = len(w.sup.calls)
    w.passes(4)                              # steady: nothing more is started or signalled
    assert [c for c in w.sup.calls[before:] if c[0] != "getAllProcessInfo"] == []


def test_warm_recycle_promotes_the_standby_stops_the_offender_then_starts_a_fresh_one(
        tmp_path, caplog):
    caplog.set_level(logging.INFO, "fcgi_toolkit.watchdog")
    w = warm_world(tmp_path, limits={"max_rss": "100MB"})
    started_warm(w)
    old = w.sup.running()
    w.sup.rss[old["wiki_00"]] = 150 * MB
    w.co.run_pass()
    # The standby is told to take over; nothing is started yet, nothing stopped.
    assert w.sup.named_calls("signalProcess") == [("signalProcess", "wiki:wiki_02", "USR2")]
    assert w.sup.named_calls("startProcess") == [] and w.sup.named_calls("stopProcess") == []
    assert w.state()["recycle"]["wiki_00"]["warm"] is True
    w.co.run_pass()                          # wiki_02 accepts: the offender is stopped
    assert w.sup.named_calls("stopProcess") == [("stopProcess", "wiki:wiki_00", False)]
    for _ in range(6):
        assert len(accepting(w)) >= 2        # the capacity guard, every pass
        w.passes(1)
    st = w.state()
    assert st["recycle"] is None and st["slots"]["wiki_00"]["by_reason"] == {"rss": 1}
    # The offender's slot was started again and is the next warm standby.
    assert w.sup.named_calls("startProcess") == [("startProcess", "wiki:wiki_00", False)]
    assert accepting(w) == {"wiki_01", "wiki_02"} and warm(w) == {"wiki_00"}
    done = [r.getMessage() for r in caplog.records if r.getMessage().startswith("recycled ")]
    assert len(done) == 1 and "replacement=wiki_02" in done[0]


def test_warm_recycle_is_done_within_the_pass_after_the_promotion(tmp_path):
    w = warm_world(tmp_path, limits={"max_rss": "100MB"})
    started_warm(w)
    w.sup.rss[w.sup.running()["wiki_01"]] = 150 * MB
    w.co.run_pass()
    w.co.run_pass()
    took = [op for op in w.co.state.recycle.values()]
    assert took and took[0].phase.value == "stopping" and took[0].took == 0.0


def test_warm_promotion_lost_by_a_killed_listener_is_sent_again(tmp_path):
    w = warm_world(tmp_path, limits={"max_rss": "100MB"})
    started_warm(w)
    w.sup.rss[w.sup.running()["wiki_00"]] = 150 * MB
    real = w.sup.signalProcess
    w.sup.signalProcess = lambda spec, sig: True       # the signal never arrives
    w.co.run_pass()
    w.sup.signalProcess = real
    w.new_coordinator()                      # the listener restarts from the state file
    w.passes(8)
    assert [c[1:] for c in w.sup.named_calls("signalProcess")] == [("wiki:wiki_02", "USR2")]
    assert w.state()["recycle"] is None
    assert w.state()["slots"]["wiki_00"]["recycles"] == 1


def test_warm_standby_that_never_takes_over_fails_the_recycle_and_the_offender_serves(tmp_path):
    w = warm_world(tmp_path, limits={"max_rss": "100MB"})
    started_warm(w)
    old = w.sup.running()
    w.sup.rss[old["wiki_00"]] = 150 * MB
    w.sup.signalProcess = lambda spec, sig: True       # deaf standby
    for _ in range(50):                      # past recycle.ready_timeout (10 s)
        w.passes(1)
        assert "wiki_00" in accepting(w) or w.state()["recycle"] is None
    assert ("stopProcess", "wiki:wiki_02", False) in w.sup.calls
    assert ("stopProcess", "wiki:wiki_00", False) not in w.sup.calls
    assert w.sup.running()["wiki_00"] == old["wiki_00"]
    assert w.state()["slots"]["wiki_02"]["fails"] >= 1


def test_warm_standby_is_not_judged_and_an_operator_recycle_of_it_is_refused(tmp_path):
    w = warm_world(tmp_path, limits={"max_rss": "100MB"})
    started_warm(w)
    w.sup.rss[w.sup.running()["wiki_02"]] = 150 * MB   # the standby: it serves nothing
    rid = statefile.enqueue(w.dep.runtime_dir, {"op": "recycle", "worker": "02"})
    w.passes(4)
    assert w.sup.named_calls("stopProcess") == [] and w.state()["recycle"] is None
    res = statefile.result(w.dep.runtime_dir, rid)
    assert res["ok"] is False and "warm standby" in res["message"]


def test_warm_operator_recycle_goes_through_the_standby(tmp_path):
    w = warm_world(tmp_path)
    started_warm(w)
    old = w.sup.running()
    rid = statefile.enqueue(w.dep.runtime_dir, {"op": "recycle", "worker": "01"})
    w.passes(6)
    res = statefile.result(w.dep.runtime_dir, rid)
    assert res["ok"] is True and "wiki_01 replaced" in res["message"]
    assert accepting(w) == {"wiki_00", "wiki_02"} and warm(w) == {"wiki_01"}
    assert w.sup.running()["wiki_00"] == old["wiki_00"]


def test_warm_reload_stops_the_old_standby_first_then_replaces_each_worker(tmp_path, caplog):
    caplog.set_level(logging.INFO, "fcgi_toolkit.watchdog")
    w = warm_world(tmp_path)
    started_warm(w)
    old = set(w.sup.running().values())
    rid = statefile.enqueue(w.dep.runtime_dir, {"op": "reload"})
    w.co.run_pass()
    assert w.sup.named_calls("stopProcess") == [("stopProcess", "wiki:wiki_02", False)]
    assert w.sup.named_calls("signalProcess") == []      # old code is never promoted
    for _ in range(40):
        assert len(accepting(w)) >= 2
        w.passes(1)
    res = statefile.result(w.dep.runtime_dir, rid)
    assert res and res["ok"] and "reloaded 2 workers" in res["message"], res
    assert not old & set(w.sup.running().values())
    assert len(accepting(w)) == 2 and len(warm(w)) == 1


def test_warm_fresh_over_limit_backs_off_with_bounded_recycles(tmp_path, caplog):
    w = warm_world(tmp_path, limits={"max_rss": "100MB"})
    w.sup.default_rss = 150 * MB             # every fresh worker is over the limit
    w.passes(4)
    for _ in range(40):                      # 10 s of passes
        w.passes(1)
        assert len(accepting(w)) >= 1
    starts = len(w.sup.named_calls("startProcess"))
    assert 3 <= starts <= 6                  # the first three, then at most a few
    assert any(s["flapping"] for s in w.state()["slots"].values())
    assert any("is flapping" in r.getMessage() for r in caplog.records
               if r.levelno >= logging.ERROR)


def test_warm_young_worker_grown_past_the_limit_is_replaced_at_once(tmp_path):
    w = warm_world(tmp_path, limits={"max_rss": "100MB"}, recycle={"flap_window": "60s"})
    # Started at 20 MB (its baseline): it grew, it is not flapping, however young.
    started_warm(w)
    young = w.sup.running()["wiki_00"]
    w.sup.rss[young] = 150 * MB
    w.passes(3)
    assert young not in w.sup.running().values()
    assert not any(s.get("flapping") for s in w.state()["slots"].values())
    assert w.state()["slots"]["wiki_00"]["by_reason"] == {"rss": 1}


def test_warm_hard_ceiling_stops_at_once_and_the_standby_takes_over(tmp_path):
    w = warm_world(tmp_path, limits={"max_rss": "100MB", "max_rss_hard": "200MB"},
                   recycle={"max_concurrent": 1})
    started_warm(w)
    pids = w.sup.running()
    w.sup.rss[pids["wiki_00"]] = 150 * MB
    w.sup.rss[pids["wiki_01"]] = 250 * MB    # over the ceiling
    w.co.run_pass()
    assert ("stopProcess", "wiki:wiki_01", False) in w.sup.calls
    for _ in range(12):
        assert accepting(w)                  # never zero
        w.passes(1)
    assert pids["wiki_01"] not in w.sup.running().values()
    assert len(accepting(w)) == 2


def test_warm_a_fresh_standby_brings_the_next_pass_forward_for_a_waiting_breach(tmp_path):
    w = warm_world(tmp_path, limits={"max_rss": "100MB"})
    started_warm(w)
    pids = w.sup.running()
    w.sup.rss[pids["wiki_00"]] = w.sup.rss[pids["wiki_01"]] = 150 * MB   # both at once
    w.co.run_pass()
    assert len(w.co.state.recycle) == 1
    for _ in range(10):                      # the first recycle, until it ends
        w.co.run_pass()
        if not w.co.state.recycle:
            break
    # The pass that saw the offender gone refilled its slot at once.
    assert [c[1] for c in w.sup.named_calls("startProcess")] == ["wiki:wiki_00"]
    assert not w.co.urgent()                 # the fresh standby is still importing
    w.sup.step()                             # ...and now says standby in its slot
    assert w.co.urgent() and not w.co.urgent()             # once per standby
    w.co.run_pass()
    assert len(w.co.state.recycle) == 1      # the second offender, through the new standby


def test_warm_reload_whose_new_standby_fails_stops_at_once_and_the_old_workers_serve(tmp_path):
    w = warm_world(tmp_path)
    started_warm(w)
    serving = {n: p for n, p in w.sup.running().items() if n in accepting(w)}
    w.sup.fail_start.add("wiki_02")          # the new code does not import
    w.sup.logs["wiki_02"] = "Traceback (most recent call last):\nImportError: broken v2\n"
    rid = statefile.enqueue(w.dep.runtime_dir, {"op": "reload"})
    for _ in range(6):                       # far less than recycle.ready_timeout (10 s)
        w.passes(1)
    res = statefile.result(w.dep.runtime_dir, rid)
    assert res and not res["ok"] and "wiki_02 BACKOFF: ImportError: broken v2" in res["message"]
    assert w.co.state.reload is None
    assert {n: p for n, p in w.sup.running().items() if n in accepting(w)} == serving
