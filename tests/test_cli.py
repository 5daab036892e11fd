"""The commands init, check, render, run and settings-table, run as a user would
(``python -m fcgi_toolkit ...`` in a subprocess): exit statuses, one-line
errors naming file, key and value, and nothing written on error."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

import pytest

from fcgi_toolkit import settings

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
APPS = os.path.join(REPO, "tests", "apps")


def toolkit(*args: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fcgi_toolkit", *args], cwd=cwd, stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=120)


GOOD = '[app]\nname = "core"\nwsgi = "core_app:application"\ndirectory = "%s"\n' % APPS

#: (id, file text, key named in the error, value shown in the error)
BAD_FILES = [
    ("malformed-toml", GOOD + "[workers\n", None, None),
    ("unknown-key", GOOD + "[workers]\ncuont = 2\n", "workers.cuont", "2"),
    ("wrong-type", GOOD + '[workers]\ncount = "two"\n', "workers.count", "'two'"),
    ("bad-size", GOOD + '[limits]\nmax_rss = "256XB"\n', "limits.max_rss", "'256XB'"),
    ("wsgi-without-colon", '[app]\nname = "core"\nwsgi = "core_app.application"\n', "app.wsgi",
     "'core_app.application'"),
    ("name-with-space", '[app]\nname = "my app"\nwsgi = "a:b"\n', "app.name", "'my app'"),
    ("name-with-brackets", '[app]\nname = "app]\\n[program:x"\nwsgi = "a:b"\n', "app.name",
     "'app]\\n[program:x'"),
    ("newline-in-value", GOOD + '[nginx]\nserver_name = "a\\nb"\n', "nginx.server_name", "'a\\nb'"),
    ("section-injection", GOOD + '[workers]\nuser = "x\\n[program:evil]\\ncommand=/bin/sh"\n', "workers.user",
     "'x\\n[program:evil]\\ncommand=/bin/sh'"),
    ("directive-injection", GOOD + '[nginx]\nlisten = "8080; include /etc/passwd"\n', "nginx.listen",
     "'8080; include /etc/passwd'"),
    ("socket-not-absolute", GOOD + '[workers]\nsocket = "unix://run/core.sock"\n', "workers.socket",
     "'unix://run/core.sock'"),
    # Safe defaults (issue 16): an exposed TCP socket, more workers than memory holds.
    ("exposed-tcp-socket", GOOD + '[workers]\nsocket = "tcp://0.0.0.0:9000"\n', "workers.socket",
     "'tcp://0.0.0.0:9000'"),
    ("count-above-memory", GOOD + '[workers]\ncount = 100000\n', "workers.count", "100000"),
]


def assert_one_line_error(r: subprocess.CompletedProcess, path: str, key, value) -> None:
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("fcgi-toolkit: %s: " % path)
    if key:
        assert "%s = %s: " % (key, value) in lines[0]
    assert r.stdout == ""


@pytest.mark.parametrize("text, key, value", [b[1:] for b in BAD_FILES], ids=[b[0] for b in BAD_FILES])
@pytest.mark.parametrize("command", ["check", "render", "run"])
def test_bad_deployment_file(tmp_path, command, text, key, value):
    path = tmp_path / "deploy.toml"
    path.write_text(text)
    out = tmp_path / "out"
    args = [command, "-c", str(path)] + (["-o", str(out)] if command == "render" else [])
    r = toolkit(*args, cwd=str(tmp_path))
    assert_one_line_error(r, str(path), key, value)
    assert sorted(os.listdir(tmp_path)) == ["deploy.toml"], "nothing written"


def test_render_writes_three_files(tmp_path):
    path = tmp_path / "deploy.toml"
    path.write_text(GOOD)
    r = toolkit("render", "-c", str(path), "-o", str(tmp_path / "out"))
    assert r.returncode == 0, r.stderr
    assert sorted(os.listdir(tmp_path / "out")) == ["nginx-site.conf", "nginx.conf", "supervisord.conf"]
    assert r.stdout.split() == [str(tmp_path / "out" / n) for n in ("supervisord.conf", "nginx.conf",
                                                                       "nginx-site.conf")]


def test_check_ok_and_imports_the_app(tmp_path):
    path = tmp_path / "deploy.toml"
    path.write_text(GOOD)
    r = toolkit("check", "-c", str(path))
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("%s: ok (core_app:application" % path)
    assert not os.path.exists(tmp_path / ".fcgi-toolkit"), "check writes nothing"


def test_check_reports_an_app_that_cannot_import(tmp_path):
    path = tmp_path / "deploy.toml"
    path.write_text(GOOD.replace("core_app:", "core_broken:"))
    r = toolkit("check", "-c", str(path))
    assert r.returncode == 1
    assert "app.wsgi = 'core_broken:application': the app does not import" in r.stderr
    assert "Traceback" in r.stderr and "core_missing_dependency_xyz" in r.stderr
    r = toolkit("check", "--no-import", "-c", str(path))
    assert r.returncode == 0 and "import not checked" in r.stdout


def test_check_reports_a_missing_callable(tmp_path):
    path = tmp_path / "deploy.toml"
    path.write_text(GOOD.replace("core_app:application", "core_app:no_such_callable"))
    r = toolkit("check", "-c", str(path))
    assert r.returncode == 1 and "AttributeError" in r.stderr


def test_init_writes_a_loadable_file_and_refuses_to_overwrite(tmp_path):
    r = toolkit("init", "Wiki_App.wsgi:application", cwd=str(tmp_path))
    assert r.returncode == 0, r.stderr
    dep = settings.load(str(tmp_path / "deploy.toml"))
    assert dep.name == "wiki_app" and dep.app.wsgi == "Wiki_App.wsgi:application"
    text = (tmp_path / "deploy.toml").read_text()
    # Every registered setting is listed in the starter file.
    for s in settings.REGISTRY:
        assert re.search(r"^(# )?%s = " % s.name, text, re.M), s.key

    (tmp_path / "deploy.toml").write_text("# mine\n")
    r = toolkit("init", "other:app", cwd=str(tmp_path))
    assert r.returncode == 1 and "use --force" in r.stderr
    assert (tmp_path / "deploy.toml").read_text() == "# mine\n"
    r = toolkit("init", "other:app", "--name", "other", "--force", cwd=str(tmp_path))
    assert r.returncode == 0
    assert settings.load(str(tmp_path / "deploy.toml")).name == "other"
    assert sorted(os.listdir(tmp_path)) == ["deploy.toml"], "no temporary file left"


@pytest.mark.parametrize("args, key", [
    (["init", "wikiapp.application"], "app.wsgi"),
    (["init", "wikiapp:application", "--name", "my wiki"], "app.name"),
    (["init", "wikiapp:application", "--name", "x]\n[program:evil]"], "app.name"),
])
def test_init_bad_input(tmp_path, args, key):
    r = toolkit(*args, cwd=str(tmp_path))
    assert r.returncode == 2
    assert len(r.stderr.strip().splitlines()) == 1 and key in r.stderr
    assert os.listdir(tmp_path) == []


def test_init_file_passes_check(tmp_path):
    shutil.copy(os.path.join(APPS, "core_app.py"), tmp_path)
    assert toolkit("init", "core_app:application", cwd=str(tmp_path)).returncode == 0
    r = toolkit("check", cwd=str(tmp_path))
    assert r.returncode == 0, r.stderr


def test_settings_table_is_the_registry_and_in_readme():
    r = toolkit("settings-table")
    assert r.returncode == 0 and r.stdout == settings.settings_table()
    with open(os.path.join(REPO, "README.rst"), encoding="utf-8") as f:
        readme = f.read()
    start = readme.index(".. settings-table-start\n\n") + len(".. settings-table-start\n\n")
    end = readme.index("\n.. settings-table-end")
    assert readme[start:end] == settings.settings_table(), \
        "README.rst's settings table is stale: paste `fcgi-toolkit settings-table` between the markers"


def _readme_command(marker):
    """The one command in the literal block that follows ``.. MARKER`` in README.rst."""
    with open(os.path.join(REPO, "README.rst"), encoding="utf-8") as f:
        lines = f.read().splitlines()
    start = lines.index(".. %s" % marker)
    commands = [line.strip() for line in lines[start + 1:start + 6] if line.startswith("    ")]
    assert len(commands) == 1, "README.rst: expected one command after .. %s" % marker
    return commands[0]


def test_readme_keeps_the_setup_commands():
    demo = _readme_command("demo-command")
    tests = _readme_command("test-command")
    assert "nginx" in demo and demo.endswith("fcgi-toolkit demo")
    # The integration tests need nginx, cgi-fcgi and wrk from the distribution.
    assert all(pkg in tests for pkg in ("nginx-light", "libfcgi-bin", "wrk"))
    assert tests.endswith("tox")


def test_ci_runs_the_readme_test_command():
    with open(os.path.join(REPO, ".ci", "run"), encoding="utf-8") as f:
        program = re.search(r"awk '([^']*)' README.rst", f.read()).group(1)
    r = subprocess.run(["awk", program, "README.rst"], cwd=REPO, capture_output=True, text=True, timeout=10)
    assert r.stdout.strip() == _readme_command("test-command")


def test_readme_is_valid_restructuredtext():
    docutils_core = pytest.importorskip("docutils.core")
    with open(os.path.join(REPO, "README.rst"), encoding="utf-8") as f:
        docutils_core.publish_string(f.read(), writer="null",
                                     settings_overrides={"report_level": 2, "halt_level": 2})


def test_console_script_and_module_are_the_same_main():
    script = shutil.which("fcgi-toolkit")
    if script is None:
        pytest.skip("fcgi-toolkit console script not installed (pip install -e .)")
    r = subprocess.run([script, "--help"], capture_output=True, text=True, timeout=60)
    m = toolkit("--help")
    assert r.returncode == 0 and r.stdout == m.stdout
    for command in ("init", "check", "render", "run", "demo", "settings-table"):
        assert command in r.stdout


def test_run_refuses_a_missing_nginx(tmp_path):
    path = tmp_path / "deploy.toml"
    path.write_text(GOOD + '[nginx]\nbinary = "/nonexistent/nginx"\n')
    r = toolkit("run", "-c", str(path))
    assert r.returncode == 2 and "nginx.managed" in r.stderr
    assert sorted(os.listdir(tmp_path)) == ["deploy.toml"]


# -- several hosts: run on a host, never on the front view; init's example ----

def multi_host_file(tmp_path, runtime_dir, port=9000) -> str:
    path = tmp_path / "deploy.toml"
    path.write_text(GOOD + '[workers]\ncount = 1\nstandby = 1\ngraceful_timeout = "5s"\n'
                    '[nginx]\nweb_servers = ["127.0.0.1"]\nbinary = "/nonexistent/nginx"\n'
                    '[runtime]\ndir = "%s"\n'
                    '[[hosts]]\nname = "web1"\naddress = "127.0.0.2:%d"\n'
                    '[[hosts]]\nname = "web2"\naddress = "127.0.0.3:%d"\n' % (runtime_dir, port, port))
    return str(path)


def test_run_refuses_the_front_view_of_a_multi_host_file(tmp_path):
    path = multi_host_file(tmp_path, tmp_path / "rt")
    env = {k: v for k, v in os.environ.items() if k != settings.HOST_ENV}
    r = subprocess.run([sys.executable, "-m", "fcgi_toolkit", "run", "-c", path], env=env,
                       stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stdout == ""
    (line,) = r.stderr.strip().splitlines()
    assert line.startswith("fcgi-toolkit: %s: [[hosts]]: " % path)
    assert "FCGI_TOOLKIT_HOST=NAME fcgi-toolkit run -c %s" % path in line
    assert "nginx -c" in line and "(hosts: web1, web2)" in line
    assert sorted(os.listdir(tmp_path)) == ["deploy.toml"], "nothing rendered or started"

    # check on the same view names the hosts (there is no worker socket of its own).
    r = subprocess.run([sys.executable, "-m", "fcgi_toolkit", "check", "-c", path], env=env,
                       stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "hosts web1 127.0.0.2:9000 (1 workers), web2 127.0.0.3:9000 (1 workers)" in r.stdout


def test_run_on_a_host_view_needs_no_nginx(tmp_path):
    """FCGI_TOOLKIT_HOST=web1 fcgi-toolkit run: that host's supervisord, its
    workers on the host's address, no nginx (none is installed here: the
    configured binary does not exist) and no "open:" URL; TERM stops it."""
    import signal
    import tempfile
    import threading
    import time
    from harness import free_port, port_open
    runtime_dir = tempfile.mkdtemp(prefix="fct-h11-")
    proc = None
    try:
        port = free_port("127.0.0.2")
        path = multi_host_file(tmp_path, runtime_dir, port)
        dep = settings.load(path, host="web1")
        proc = subprocess.Popen([sys.executable, "-m", "fcgi_toolkit", "run", "-c", path],
                                env=dict(os.environ, FCGI_TOOLKIT_HOST="web1"),
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True, start_new_session=True)
        lines = []
        reader = threading.Thread(target=lambda: lines.extend(proc.stderr), daemon=True)
        reader.start()

        def serving() -> bool:
            assert proc.poll() is None, "run exited: %r" % lines
            return port_open(port, "127.0.0.2", timeout=2)

        deadline = time.monotonic() + 60
        while not serving():
            assert time.monotonic() < deadline, "web1's socket never listened: %r" % lines
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
        reader.join(10)
        text = "".join(lines)
        assert "fcgi-toolkit: running core on host web1 (1 workers + 1 standby)" in text
        assert "socket:  tcp://127.0.0.2:%d" % port in text
        assert "open:" not in text and "nginx.managed" not in text
        assert os.path.isfile(dep.supervisord_conf) and dep.runtime_dir == os.path.join(runtime_dir, "web1")
        assert "nginx.conf" not in os.listdir(dep.runtime_dir), "a host renders no nginx files"
    finally:
        if proc is not None and proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
        shutil.rmtree(runtime_dir, ignore_errors=True)


def test_init_shows_a_commented_hosts_example(tmp_path):
    r = toolkit("init", "core_app:application", cwd=str(tmp_path))
    assert r.returncode == 0, r.stderr
    text = (tmp_path / "deploy.toml").read_text()
    assert "\n# [[hosts]]\n" in text
    for s in settings.HOST_REGISTRY:
        assert re.search(r"^# %s = " % s.name, text[text.index("# [[hosts]]"):], re.M), s.name
    # Uncommented (table and keys) and with nginx.web_servers, it is a valid multi-host file.
    example = text[text.index("# [[hosts]]"):]
    head = re.sub(r"^# web_servers = .*$", 'web_servers = ["10.0.0.5"]',
                  text[:text.index("# [[hosts]]")], flags=re.M)
    uncommented = re.sub(r"^# (\[\[hosts\]\]|[a-z_]+ = )", r"\1", example, flags=re.M)
    (tmp_path / "deploy.toml").write_text(head + uncommented)
    dep = settings.load(str(tmp_path / "deploy.toml"), host="")
    assert dep.host_names() == ["web1"] and dep.hosts[0].address == "10.0.0.11:9000"
    assert dep.nginx.web_servers == ["10.0.0.5"] and dep.hosts[0].count == 2
