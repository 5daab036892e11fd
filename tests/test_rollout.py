"""Tier 2: the rollout shell (fcgi_toolkit.rollout.Roller) against recording
fakes of the hosts' supervisords and of the nginx reload: the order of the
steps, what is refused before anything changes, and the rollback."""
from __future__ import annotations

import io
import itertools
import json
import os
import xmlrpc.client

import pytest

from fcgi_toolkit import applying, respawn, rollout, settings
from harness import toml_dumps

NAMES = ("web1", "web2", "web3")


def write(tmp_path, **changes) -> settings.Deployment:
    raw = {"app": {"name": "wiki", "wsgi": "wikiapp:application", "environment": {"RELEASE": "1"}},
           "nginx": {"web_servers": ["127.0.0.1"]},
           "runtime": {"dir": str(tmp_path / "rt")},
           "control": {"inet_port": "9001", "username": "ops", "password": "s3cret"},
           "hosts": [{"name": n, "address": "127.0.0.%d:9000" % (i + 2)} for i, n in enumerate(NAMES)]}
    for section, table in changes.items():
        if section == "hosts":
            raw["hosts"] = table
        else:
            raw[section].update(table)
    hosts = raw.pop("hosts")
    text = toml_dumps(raw) + "".join(
        "\n[[hosts]]\n" + "".join("%s = %s\n" % (k, json.dumps(v)) for k, v in h.items())
        for h in hosts)
    path = tmp_path / "deploy.toml"
    path.write_text(text)
    return settings.load(str(path), host="")


class FakeHost:
    """One host's supervisord as the rollout sees it over its control port."""

    def __init__(self, cluster, name, values, digest):
        self.cluster, self.name = cluster, name
        self.values, self.digest = values, digest
        self.identity = "wiki_%s" % name
        self.supervised = True
        self.count = values["workers.count"]
        self.pids = self.new_pids()
        self.answering = True
        self.next_start = "ready"          # what the next supervisord's worker does
        self.previous_start = "ready"

    # The proxy interface: a context manager with .supervisor and .fcgi.
    def __enter__(self):
        if not self.answering:
            raise ConnectionRefusedError(111, "Connection refused")
        return self

    def __exit__(self, *exc):
        return False

    @property
    def supervisor(self):
        return self

    @property
    def fcgi(self):
        return self

    def getIdentification(self):
        return self.identity

    def applied(self):
        return json.dumps({"values": self.values, "digest": self.digest,
                           "respawn": self.supervised, "pid": 1})

    def status(self):
        state = {"ready": ("ready", "RUNNING"), "broken": ("down", "BACKOFF")}[self.start]
        return json.dumps({"workers": [
            {"name": "wiki_%02d" % i, "pid": pid if state[0] == "ready" else 0,
             "state": state[0], "supervisor_state": state[1]} for i, pid in enumerate(self.pids)]})

    start = "ready"

    def respawn(self, digest, previous):
        self.cluster.events.append(("respawn", self.name, previous))
        if not previous and digest != self.digest:
            raise xmlrpc.client.Fault(2, "not the web server's file")
        self.start = self.previous_start if previous else self.next_start
        self.pids = self.new_pids()
        return True

    def new_pids(self):
        return [next(self.cluster.pids) for _ in range(self.count)]


class Cluster:
    def __init__(self, running: settings.Deployment, file: settings.Deployment):
        self.events: list = []
        self.pids = itertools.count(1000)
        digest = respawn.digest(file.path)
        self.hosts = {n: FakeHost(self, n, applying.values(running.for_host(n)), digest)
                      for n in running.host_names()}
        self.fail_reload = False

    def connect(self, spec):
        return self.hosts[spec.name]

    def reload(self, view, drain):
        if self.fail_reload:
            raise rollout.ReloadError("nginx -s reload: exit status 1")
        self.events.append(("nginx", tuple(sorted(view.out_of_rotation)), drain,
                            tuple(s.address for s in view.hosts)))
        return True


def roll(tmp_path, cluster, file, everyone=False, alive=lambda pid: False):
    out, err = io.StringIO(), io.StringIO()
    ticks = itertools.count()
    roller = rollout.Roller(file, out, err, cluster.connect, cluster.reload,
                            clock=lambda: float(next(ticks)), sleep=lambda s: None, alive=alive)
    return roller.run(everyone=everyone), out.getvalue(), err.getvalue()


def test_hosts_go_out_restart_and_come_back_one_at_a_time(tmp_path):
    running = write(tmp_path)
    file = write(tmp_path, app={"environment": {"RELEASE": "2"}})
    cluster = Cluster(running, file)
    status, out, err = roll(tmp_path, cluster, file)
    assert status == 0, err
    addresses = ("127.0.0.2:9000", "127.0.0.3:9000", "127.0.0.4:9000")
    expected = []
    for name in NAMES:
        expected += [("nginx", (name,), True, addresses), ("respawn", name, False),
                     ("nginx", (), False, addresses)]
    expected.append(("nginx", (), False, addresses))    # the last one: no change, nothing written
    assert cluster.events == expected
    assert "every host runs %s: web1, web2, web3" % file.path in out
    assert not os.path.exists(rollout.state_path(file))


def test_a_moved_host_comes_back_at_its_new_address_the_others_stay(tmp_path):
    running = write(tmp_path)
    hosts = [{"name": n, "address": "127.0.0.%d:9000" % (i + 2)} for i, n in enumerate(NAMES)]
    hosts[0]["address"] = "127.0.0.2:9100"
    file = write(tmp_path, hosts=hosts)
    cluster = Cluster(running, file)
    status, out, err = roll(tmp_path, cluster, file)
    assert status == 0, err
    # While web1 is out, nginx names it where it runs; back, at its new address.
    assert cluster.events[0] == ("nginx", ("web1",), True,
                                 ("127.0.0.2:9000", "127.0.0.3:9000", "127.0.0.4:9000"))
    assert cluster.events[2] == ("nginx", (), False,
                                 ("127.0.0.2:9100", "127.0.0.3:9000", "127.0.0.4:9000"))
    assert [e[1] for e in cluster.events if e[0] == "respawn"] == ["web1"]


def test_a_host_that_does_not_start_goes_back_to_its_previous_file_and_stops_the_rollout(tmp_path):
    running = write(tmp_path)
    file = write(tmp_path, app={"wsgi": "broken:application"})
    cluster = Cluster(running, file)
    cluster.hosts["web1"].next_start = "broken"
    status, out, err = roll(tmp_path, cluster, file)
    assert status == 1
    assert [e for e in cluster.events if e[0] == "respawn"] == [("respawn", "web1", False),
                                                               ("respawn", "web1", True)]
    assert cluster.events[-1][:3] == ("nginx", (), False)       # back in rotation
    assert "host web1: wiki_00 did not start (BACKOFF); starting its previous deployment" in err
    assert ("not applied on web1: wiki_00 did not start (BACKOFF); web1 serves its previous "
            "deployment again, back in rotation; hosts after it untouched; no host changed") in err
    assert not os.path.exists(rollout.state_path(file))


def test_a_previous_deployment_that_does_not_come_back_leaves_the_host_out(tmp_path):
    running = write(tmp_path)
    file = write(tmp_path, app={"wsgi": "broken:application"})
    cluster = Cluster(running, file)
    cluster.hosts["web2"].next_start = cluster.hosts["web2"].previous_start = "broken"
    status, out, err = roll(tmp_path, cluster, file)
    assert status == 1 and "not applied on web2, and its previous deployment did not come back " \
        "either (wiki_00 did not start (BACKOFF)): it stays out of rotation" in err
    # web1 went first and is back; web3 is untouched; no reload put web2 back.
    assert [e[1] for e in cluster.events if e[0] == "respawn"] == ["web1", "web2", "web2"]
    assert cluster.events[-1] == ("respawn", "web2", True)


@pytest.mark.parametrize("breaks, says", [
    (lambda h: setattr(h, "answering", False), "host web2: "),
    (lambda h: setattr(h, "identity", "other_web2"), "is supervisord 'other_web2', not 'wiki_web2'"),
    (lambda h: setattr(h, "digest", "0" * 64), "host web2: its %s is not this file"),
    (lambda h: setattr(h, "supervised", False), "host web2: its supervisord was not started by "
                                                "fcgi-toolkit run"),
])
def test_every_host_is_checked_before_anything_changes(tmp_path, breaks, says):
    running = write(tmp_path)
    file = write(tmp_path, app={"environment": {"RELEASE": "2"}})
    cluster = Cluster(running, file)
    breaks(cluster.hosts["web2"])
    status, out, err = roll(tmp_path, cluster, file)
    assert status == 1 and cluster.events == []
    assert (says % file.path if "%s" in says else says) in err
    assert err.rstrip().endswith("nothing changed")


def test_keys_only_run_sets_up_are_refused_whole(tmp_path):
    running = write(tmp_path)
    file = write(tmp_path, app={"environment": {"RELEASE": "2"}},
                 runtime={"dir": str(tmp_path / "moved")})
    cluster = Cluster(running, file)
    status, out, err = roll(tmp_path, cluster, file)
    assert status == 1 and cluster.events == []
    assert "stop and run again: runtime.dir (host web1)" in err and "nothing changed" in err


def test_one_host_cannot_go_out_of_rotation(tmp_path):
    hosts = [{"name": "web1", "address": "127.0.0.2:9000"}]
    running = write(tmp_path, hosts=hosts)
    file = write(tmp_path, hosts=hosts, app={"environment": {"RELEASE": "2"}})
    cluster = Cluster(running, file)
    status, out, err = roll(tmp_path, cluster, file)
    assert status == 1 and cluster.events == []
    assert "web1 is the only host" in err


def test_nginx_only_changes_are_one_reload_and_new_supervisord_restarts_everyone(tmp_path):
    running = write(tmp_path)
    file = write(tmp_path, nginx={"read_timeout": "90s"})
    cluster = Cluster(running, file)
    status, out, err = roll(tmp_path, cluster, file)
    assert status == 0 and [e[0] for e in cluster.events] == ["nginx"]
    assert "nginx reloaded gracefully (nginx.read_timeout)" in out
    cluster = Cluster(running, running)
    status, out, err = roll(tmp_path, cluster, running, everyone=True)
    assert status == 0
    assert [e[1] for e in cluster.events if e[0] == "respawn"] == list(NAMES)
    assert "web1 (--new-supervisord)" in out


def test_a_rollout_under_way_is_not_started_twice(tmp_path):
    running = write(tmp_path)
    file = write(tmp_path, app={"environment": {"RELEASE": "2"}})
    os.makedirs(file.runtime_dir, exist_ok=True)
    rollout.Roller(file, io.StringIO(), io.StringIO(), None, None).record(
        "web2", rollout.Phase.RESTARTING, 0.0)
    state = rollout.read_state(file)
    assert rollout.format_state(state, now=65.0) == "rollout under way: host web2 restarting for 1m05s"
    cluster = Cluster(running, file)
    status, out, err = roll(tmp_path, cluster, file, alive=lambda pid: pid == state["pid"])
    assert status == 1 and cluster.events == []
    assert "a rollout (host web2, restarting) is under way (apply pid %d)" % state["pid"] in err
    # An apply killed mid-way (its pid gone): the next one takes over and finishes.
    status, out, err = roll(tmp_path, cluster, file, alive=lambda pid: False)
    assert status == 0, err
    assert "the rollout of apply pid %d stopped at host web2 (restarting)" % state["pid"] in out
    assert [e[1] for e in cluster.events if e[0] == "respawn"] == list(NAMES)



def test_a_failed_reload_stops_the_rollout_where_it_was(tmp_path):
    running = write(tmp_path)
    file = write(tmp_path, app={"environment": {"RELEASE": "2"}})
    cluster = Cluster(running, file)
    cluster.fail_reload = True
    status, out, err = roll(tmp_path, cluster, file)
    assert status == 1 and cluster.events == []
    assert "nginx: nginx -s reload: exit status 1; the rollout stopped at host web1 out of " \
           "rotation (done: none)" in err
