"""Tiers 1 and 2 of issue #13: which processes are the deployment's, the one
line about a previous life, the lifeline's decisions, and the lifeline as a
real process (also as another user) whose parent is SIGKILLed."""
from __future__ import annotations

import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import toml_dumps  # noqa: E402

import fcgi_toolkit  # noqa: E402
from fcgi_toolkit import leftovers, lifeline, settings  # noqa: E402
from fcgi_toolkit.leftovers import Kind, Leftover, Remains  # noqa: E402

SIG = leftovers.Signature(deploy_path="/srv/app/deploy.toml",
                          supervisord_conf="/run/app/supervisord.conf",
                          pidfile="/run/app/supervisord.pid",
                          nginx_conf="/run/app/nginx.conf")
PY = "/venv/bin/python"


@pytest.mark.parametrize("cmdline,kind", [
    ([PY, "-m", "supervisor.supervisord", "-n", "-c", SIG.supervisord_conf], Kind.SUPERVISORD),
    (["/usr/bin/supervisord", "-c", SIG.supervisord_conf], Kind.SUPERVISORD),
    ([PY, "-m", "fcgi_toolkit", "worker", "-c", SIG.deploy_path, "--slot", "1"], Kind.WORKER),
    ([PY, "-m", "fcgi_toolkit", "listener", "-c", SIG.deploy_path], Kind.WATCHDOG),
    ([PY, "-m", "fcgi_toolkit", "metrics", "-c", SIG.deploy_path], Kind.METRICS),
    ([PY, "-m", "fcgi_toolkit", "lifeline", "--pidfile", SIG.pidfile, "--signal", "QUIT", "--",
      "/usr/sbin/nginx", "-c", SIG.nginx_conf], Kind.NGINX),
    (["/usr/sbin/nginx", "-c", SIG.nginx_conf], Kind.NGINX),
    # nginx rewrites its title into one string
    (["nginx: master process /usr/sbin/nginx -c %s" % SIG.nginx_conf], Kind.NGINX),
    # an inner supervisord (README "Generations"), after its lifeline's exec
    ([PY, "-m", "supervisor.supervisord", "-n", "-c", "/run/app/supervisord-g3.conf"],
     Kind.SUPERVISORD),
])
def test_classify_the_commands_supervisord_runs(cmdline, kind):
    assert leftovers.classify(cmdline, SIG) is kind


@pytest.mark.parametrize("cmdline", [
    [],
    [PY, "-m", "fcgi_toolkit", "worker", "-c", "/srv/other/deploy.toml", "--slot", "1"],
    [PY, "-m", "supervisor.supervisord", "-n", "-c", "/run/other/supervisord.conf"],
    # an operator's commands on the same file are not the deployment's processes
    [PY, "-m", "fcgi_toolkit", "run", "-c", SIG.deploy_path],
    [PY, "-m", "fcgi_toolkit", "stop", "-c", SIG.deploy_path],
    ["/usr/bin/fcgi-toolkit", "status", "-c", SIG.deploy_path],
    ["vim", SIG.deploy_path],
    ["/usr/sbin/nginx", "-c", "/etc/nginx/nginx.conf"],
    ["nginx: worker process"],
    [PY, "-m", "fcgi_toolkit", "lifeline", "--pidfile", "/run/other/supervisord.pid", "--", "nginx"],
    [PY, "-m", "supervisor.supervisord", "-n", "-c", "/run/other/supervisord-g3.conf"],
    [PY, "-m", "supervisor.supervisord", "-n", "-c", "/run/app/supervisord-gx.conf"],
])
def test_classify_leaves_other_processes_alone(cmdline):
    assert leftovers.classify(cmdline, SIG) is None


def test_hosts_of_one_file_on_one_machine_keep_their_own_processes():
    """Workers are named by the file's path, which every host shares: the
    host supervisord.conf puts in their environment tells them apart."""
    assert leftovers.same_host({settings.HOST_ENV: "web1"}, "web1")
    assert not leftovers.same_host({settings.HOST_ENV: "web2"}, "web1")
    assert not leftovers.same_host({}, "web1")
    assert leftovers.same_host({}, "") and leftovers.same_host({settings.HOST_ENV: ""}, "")
    assert not leftovers.same_host({settings.HOST_ENV: "web1"}, "")
    # An environment we may not read: counted as ours (the old behaviour).
    assert leftovers.same_host(None, "web1")


def test_describe_says_what_was_found_in_one_line():
    remains = Remains(pidfile_pid=100, control_socket=True, processes=(
        Leftover(102, Kind.WORKER, 0.0), Leftover(101, Kind.WORKER, 0.0),
        Leftover(103, Kind.WATCHDOG, 0.0), Leftover(104, Kind.NGINX, 0.0)))
    line = leftovers.describe("wiki", remains, 10.0)
    assert "\n" not in line
    assert line == ("fcgi-toolkit: wiki: a previous supervisord left pid file (supervisord pid 100, "
                    "gone), a control socket nobody answers, worker 101 102, watchdog 103, nginx 104; "
                    "ending them (graceful signal, SIGKILL after 10s)")
    alive = Remains(100, False, (Leftover(100, Kind.SUPERVISORD, 0.0),))
    assert "pid 100, still alive" in leftovers.describe("wiki", alive, 2.5)
    files_only = leftovers.describe("wiki", Remains(100, True, ()), 10.0)
    assert files_only.endswith("; no process left")
    assert Remains(None, False, ()).empty and not Remains(None, True, ()).empty


def test_find_names_what_inner_supervisords_left_and_forget_removes_it(tmp_path):
    path = tmp_path / "deploy.toml"
    path.write_text('[app]\nname = "wiki"\nwsgi = "x:y"\n[runtime]\ndir = "run"\n')
    dep = settings.load(str(path))
    os.makedirs(dep.runtime_dir)
    for name in ("supervisord-g2.conf", "supervisord-g2.pid", "supervisor-g2.sock",
                 "supervisord.conf", "scoreboard"):
        (tmp_path / "run" / name).write_text("")
    remains = leftovers.find(dep)
    assert [os.path.basename(p) for p in remains.inner_files] == [
        "supervisor-g2.sock", "supervisord-g2.conf", "supervisord-g2.pid"]
    assert not remains.empty
    assert "inner supervisord files (supervisor-g2.sock supervisord-g2.conf supervisord-g2.pid)" \
        in leftovers.describe("wiki", remains, 10.0)
    leftovers.forget_inner_files(remains)
    assert sorted(os.listdir(dep.runtime_dir)) == ["scoreboard", "supervisord.conf"]


def test_graceful_signals():
    assert leftovers.GRACEFUL_SIGNAL[Kind.NGINX] == signal.SIGQUIT
    assert {leftovers.GRACEFUL_SIGNAL[k] for k in Kind if k is not Kind.NGINX} == {signal.SIGTERM}


# -- lifeline: pure decisions --------------------------------------------------

def test_read_pid(tmp_path):
    p = tmp_path / "x.pid"
    assert lifeline.read_pid(str(p)) is None
    p.write_text("1234\n")
    assert lifeline.read_pid(str(p)) == 1234
    for bad in ("", "abc", "-5", "0", "12 13"):
        p.write_text(bad)
        assert lifeline.read_pid(str(p)) is None, bad


def test_orphaned_before_arming(tmp_path):
    pidfile = tmp_path / "supervisord.pid"
    pidfile.write_text("500\n")
    under = {"SUPERVISOR_ENABLED": "1"}
    assert lifeline.orphaned_before_arming(str(pidfile), 1, under)
    assert not lifeline.orphaned_before_arming(str(pidfile), 500, under)
    assert not lifeline.orphaned_before_arming(str(pidfile), 1, {}), "not run by supervisord"
    assert not lifeline.orphaned_before_arming(str(tmp_path / "none"), 1, under), "nothing to compare"
    # A stale pid file under another supervisord (the distribution's, after install).
    assert not lifeline.orphaned_before_arming(str(pidfile), 700, under, parent_is_supervisord=True)


def test_is_supervisord_reads_the_command_line():
    assert not lifeline.is_supervisord(os.getpid())   # pytest
    assert not lifeline.is_supervisord(2 ** 22 + 1)   # no such process


def test_parent_watch_fires_once_when_the_parent_changes():
    ppid = [40]
    calls = []
    watch = lifeline.ParentWatch(40, lambda: calls.append(1), getppid=lambda: ppid[0])
    assert watch.check() is False and calls == []
    ppid[0] = 1
    assert watch.check() is True and calls == [1]
    assert watch.check() is True and calls == [1], "fires once"


def test_deployment_knows_its_pid_file(tmp_path):
    path = tmp_path / "deploy.toml"
    path.write_text(toml_dumps({"app": {"name": "w", "wsgi": "m:app"},
                                "runtime": {"dir": str(tmp_path / "run")}}))
    dep = settings.load(str(path))
    assert dep.supervisord_pidfile == os.path.join(dep.runtime_dir, "supervisord.pid")
    assert leftovers.Signature.of(dep).pidfile == dep.supervisord_pidfile


# -- lifeline as a process: its parent is SIGKILLed --------------------------------

#: The child: arms the lifeline (or only one of its two mechanisms), then waits for its
#: SIGTERM, which its handler turns into a clean exit (as a worker drains).
#: Its stdout is the test's pipe, inherited through the parent.
CHILD = textwrap.dedent("""
    import os, signal, sys, time
    from fcgi_toolkit import lifeline
    stop = []
    signal.signal(signal.SIGTERM, lambda s, f: stop.append(s))
    if sys.argv[1] == "guard":
        lifeline.guard(signal.SIGTERM, "/nonexistent/supervisord.pid")
    elif sys.argv[1] == "pdeathsig":
        assert lifeline.set_parent_death_signal(signal.SIGTERM)
    else:
        lifeline.ParentWatch(os.getppid(), lambda: os.kill(os.getpid(), signal.SIGTERM)).start()
    print("armed uid=%d" % os.getuid(), flush=True)
    deadline = time.monotonic() + 30
    while not stop and time.monotonic() < deadline:
        time.sleep(0.05)
    print("stopped by SIGTERM" if stop else "no signal", flush=True)
""")

#: The parent (standing in for supervisord): starts the child, as ``user=``
#: does (setuid before exec), and waits to be killed.
PARENT = textwrap.dedent("""
    import subprocess, sys, time
    subprocess.Popen([sys.argv[1], "-c", sys.argv[2], sys.argv[4]], user=sys.argv[3] or None,
                     env={"PYTHONPATH": sys.argv[5], "SUPERVISOR_ENABLED": "1"}, cwd="/")
    time.sleep(60)
""")


def _nobody_can_run(python: str) -> bool:
    try:
        pwd.getpwnam("nobody")
    except KeyError:
        return False
    return os.geteuid() == 0 and os.access(python, os.X_OK)


@pytest.mark.parametrize("user,mode", [("", "guard"), ("", "watch"), ("", "pdeathsig"),
                                       ("nobody", "guard"), ("nobody", "pdeathsig")],
                         ids=["same-user", "parent-watch-only", "signal-only",
                              "as-nobody", "as-nobody-signal-only"])
def test_child_stops_when_its_parent_is_killed(request, user, mode):
    python = sys.executable
    if user:
        # The test venv's interpreter lives under /root here; the system one
        # can run lifeline.py (standard library only, with sigthreads.py) as nobody.
        python = "/usr/bin/python3"
        if not _nobody_can_run(python):
            pytest.skip("needs root, a nobody user and /usr/bin/python3")
    package_root = os.path.dirname(os.path.dirname(os.path.abspath(fcgi_toolkit.__file__)))
    if user:
        # The package as installed for the tests may sit in a private directory
        # (.tox is 0700): give the other user a readable copy of the files it needs.
        package_root = tempfile.mkdtemp(prefix="fct-lifeline-")
        request.addfinalizer(lambda: shutil.rmtree(package_root, ignore_errors=True))
        os.chmod(package_root, 0o755)
        os.makedirs(os.path.join(package_root, "fcgi_toolkit"), mode=0o755)
        for name in ("__init__.py", "lifeline.py", "sigthreads.py"):
            shutil.copy(os.path.join(os.path.dirname(fcgi_toolkit.__file__), name),
                        os.path.join(package_root, "fcgi_toolkit", name))
    parent = subprocess.Popen([sys.executable, "-c", PARENT, python, CHILD, user, mode, package_root],
                              stdout=subprocess.PIPE, stdin=subprocess.DEVNULL)
    try:
        armed = parent.stdout.readline().decode()
        uid = pwd.getpwnam(user).pw_uid if user else os.getuid()
        assert armed == "armed uid=%d\n" % uid, armed
        parent.kill()
        parent.wait(10)
        # EOF once the child is gone too: it held the pipe.  Bounded: the
        # child gives up after 30 s and says so.
        rest = parent.stdout.read().decode()
        assert rest == "stopped by SIGTERM\n", rest
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait(10)


# -- the exec wrapper -----------------------------------------------------------

def _lifeline(tmp_path, *args, env=None):
    return subprocess.run([sys.executable, "-m", "fcgi_toolkit", "lifeline",
                           "--pidfile", str(tmp_path / "supervisord.pid"), *args],
                          capture_output=True, text=True, timeout=30,
                          env=dict(os.environ, **(env or {})))


def test_lifeline_execs_the_program(tmp_path):
    r = _lifeline(tmp_path, "--signal", "QUIT", "--", "/bin/sh", "-c", "echo started $0", "x")
    assert r.returncode == 0 and r.stdout == "started x\n", r.stderr


@pytest.mark.parametrize("args,code,message", [
    ((), 2, "no program given"),
    (("--signal", "NOPE", "--", "/bin/true"), 2, "--signal NOPE"),
    (("--", "/nonexistent/program"), 127, "cannot run /nonexistent/program"),
])
def test_lifeline_refuses_with_one_line(tmp_path, args, code, message):
    r = _lifeline(tmp_path, *args)
    assert r.returncode == code and message in r.stderr and len(r.stderr.splitlines()) == 1, r.stderr


def test_lifeline_does_not_start_a_program_for_a_supervisord_gone_already(tmp_path):
    (tmp_path / "supervisord.pid").write_text("%d\n" % (os.getpid() + 1))   # not our parent
    r = _lifeline(tmp_path, "--", "/bin/sh", "-c", "echo started", env={"SUPERVISOR_ENABLED": "1"})
    assert r.returncode == 1 and r.stdout == "", r.stdout
    assert "supervisord is gone; not starting /bin/sh" in r.stderr


# -- addresses held by another program ---------------------------------------------

def _dep(tmp_path, socket_url: str, **nginx):
    path = tmp_path / "deploy.toml"
    path.write_text(toml_dumps({"app": {"name": "w", "wsgi": "m:app"},
                                "workers": {"socket": socket_url},
                                "nginx": dict({"managed": False}, **nginx),
                                "runtime": {"dir": str(tmp_path / "run")}}))
    return settings.load(str(path))


def test_a_busy_tcp_address_names_its_holder(tmp_path):
    import socket
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen(1)
        port = held.getsockname()[1]
        dep = _dep(tmp_path, "tcp://127.0.0.1:%d" % port)
        with pytest.raises(settings.ConfigError) as err:
            leftovers.check_addresses(dep)
    line = str(err.value)
    assert "\n" not in line and "workers.socket = 'tcp://127.0.0.1:%d'" % port in line
    assert "in use by pid %d (" % os.getpid() in line
    leftovers.check_addresses(dep)   # free again


def test_an_address_not_of_this_machine_is_one_line(tmp_path):
    # TEST-NET-1: never local (and, not loopback, it needs nginx.web_servers).
    dep = _dep(tmp_path, "tcp://192.0.2.1:9000", web_servers=["192.0.2.2"])
    with pytest.raises(settings.ConfigError, match=r"workers.socket = 'tcp://192.0.2.1:9000': "
                                                   r"cannot bind 192.0.2.1:9000: "):
        leftovers.check_addresses(dep)


def test_unix_socket_path_checks(tmp_path):
    import socket
    path = tmp_path / "s.sock"
    dep = _dep(tmp_path, "unix://%s" % path)
    leftovers.check_addresses(dep)            # nothing there
    path.write_text("not a socket")
    with pytest.raises(settings.ConfigError, match="exists and is not a socket"):
        leftovers.check_addresses(dep)
    path.unlink()
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(path))
        s.listen(1)
        with pytest.raises(settings.ConfigError, match=r"is served by pid %d " % os.getpid()):
            leftovers.check_addresses(dep)
    leftovers.check_addresses(dep)            # a stale socket file: supervisord replaces it
    assert path.exists()
