"""Tier 1: the deployment file's validation (settings.load / parse), no processes."""
from __future__ import annotations

import os

import pytest

from fcgi_toolkit import settings
from fcgi_toolkit.settings import REGISTRY, ConfigError

MINIMAL = '[app]\nname = "wiki"\nwsgi = "wikiapp:application"\n'


def write(tmp_path, text: str, name: str = "deploy.toml") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def load_error(tmp_path, text: str) -> str:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        settings.load(path)
    message = str(info.value)
    assert "\n" not in message, "an error is one line"
    assert message.startswith(path + ": "), "an error names the file"
    return message


def test_minimal_file_loads_with_defaults_and_absolute_paths(tmp_path):
    dep = settings.load(write(tmp_path, MINIMAL))
    assert dep.name == "wiki" and dep.app.wsgi == "wikiapp:application"
    assert dep.workers.count == 2 and dep.slots == 6   # 2 standbys, a spare slot each
    assert dep.slot_names() == ["wiki_%02d" % i for i in range(6)]
    assert dep.app.directory == str(tmp_path)
    assert dep.runtime_dir == str(tmp_path / ".fcgi-toolkit" / "wiki")
    assert dep.log_dir == os.path.join(dep.runtime_dir, "log")
    assert dep.socket_url == "unix://" + os.path.join(dep.runtime_dir, "wiki.sock")
    assert dep.socket_is_unix and dep.socket_path.endswith("/wiki.sock")


def test_sizes_and_durations_are_converted(tmp_path):
    dep = settings.load(write(tmp_path, MINIMAL + '[limits]\nmax_rss = "256MB"\nmax_age = "6h"\n'
                                                  '[workers]\ngraceful_timeout = 2.5\n'))
    assert dep.limits.max_rss == 256 * 1024 * 1024
    assert dep.limits.max_age == 6 * 3600.0
    assert dep.workers.graceful_timeout == 2.5


def test_malformed_toml(tmp_path):
    message = load_error(tmp_path, MINIMAL + "[workers\ncount = 2\n")
    assert "not valid TOML" in message


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        settings.load(str(tmp_path / "absent.toml"))


def test_unknown_key_suggests_the_closest(tmp_path):
    message = load_error(tmp_path, MINIMAL + "[workers]\ncuont = 3\n")
    assert "workers.cuont = 3" in message and "did you mean workers.count?" in message


def test_unknown_section_suggests_the_closest(tmp_path):
    message = load_error(tmp_path, MINIMAL + "[limit]\nmax_rss = 1\n")
    assert "did you mean [limits]?" in message


@pytest.mark.parametrize("section, line, key", [
    ("workers", "count = \"2\"", "workers.count"),
    ("workers", "count = 2.0", "workers.count"),
    ("workers", "count = 0", "workers.count"),
    ("workers", "threads = true", "workers.threads"),
    ("nginx", "managed = 3", "nginx.managed"),
    ("limits", "max_requests = -1", "limits.max_requests"),
    ("workers", "graceful_timeout = \"soon\"", "workers.graceful_timeout"),
])
def test_wrong_type(tmp_path, section, line, key):
    # (count = true is covered: a TOML boolean must not pass as an integer.)
    message = load_error(tmp_path, MINIMAL + "[%s]\n%s\n" % (section, line))
    shown = line.split(" = ")[1].replace("true", "True")
    assert key + " = " in message and shown in message.replace("'", '"')


def test_bad_size(tmp_path):
    message = load_error(tmp_path, MINIMAL + '[limits]\nmax_rss = "256XB"\n')
    assert "limits.max_rss = '256XB'" in message and "size" in message


def test_wsgi_without_colon(tmp_path):
    message = load_error(tmp_path, '[app]\nname = "wiki"\nwsgi = "wikiapp.application"\n')
    assert "app.wsgi = 'wikiapp.application'" in message and "':'" in message


@pytest.mark.parametrize("value", ["my wiki", "wiki[1]", "Wiki", "1wiki", "wiki-app", ""])
def test_bad_names(tmp_path, value):
    message = load_error(tmp_path, '[app]\nname = "%s"\nwsgi = "a:b"\n' % value)
    assert "app.name = %r" % value in message


def test_required_key_missing(tmp_path):
    message = load_error(tmp_path, '[app]\nname = "wiki"\n')
    assert "app.wsgi" in message and "required" in message


def test_socket_path_not_absolute(tmp_path):
    message = load_error(tmp_path, MINIMAL + '[workers]\nsocket = "unix://run/wiki.sock"\n')
    assert "workers.socket = 'unix://run/wiki.sock'" in message and "absolute" in message


def test_world_writable_socket_refused(tmp_path):
    message = load_error(tmp_path, MINIMAL + '[workers]\nsocket_mode = "0666"\n')
    assert "world-writable" in message


def test_inet_port_needs_credentials(tmp_path):
    message = load_error(tmp_path, MINIMAL + '[control]\ninet_port = "9001"\n')
    assert "control.inet_port" in message and "username" in message


# -- injection: no value may add a line, a directive or a section -------------

#: Every payload tries to end a value and start something else in
#: supervisord.conf (ini: newline, "[section]", ";" comment, "%(x)s"
#: expansion) or nginx.conf (";", "{", "}", "$var", "#", quotes, whitespace).
PAYLOADS = [
    "x\ny",
    "x\r\ny",
    "x]\n[program:evil]\ncommand=/bin/sh",
    "[program:evil]",
    "x;y",
    "x ;y",
    "x%(here)s",
    "x%y",
    'x"y',
    "x'y",
    "x{y",
    "x}y",
    "x$y",
    "x#y",
    "x\ty",
    "x\\y",
]

GOOD_VALUES = {"app.name": "wiki", "app.wsgi": "a:b", "runtime.dir": "run", "runtime.log_dir": "log",
               "control.username": "admin", "control.password": "secret"}

#: Credentials only ever go into supervisord.conf (never nginx), as the whole
#: value of one ini line: brackets, braces and '$' cannot start anything there.
#: test_render checks that such a password renders to exactly that password.
INI_ONLY = {"control.username", "control.password"}
INI_HARMLESS = {"[program:evil]", "x{y", "x}y", "x$y"}

STRING_SETTINGS = [s for s in REGISTRY
                   if isinstance(s.default, str) or s.default is settings.REQUIRED]


def _config_with(setting, value) -> dict:
    data = {"app": {"name": "wiki", "wsgi": "wikiapp:application"},
            "control": {"inet_port": "9001", "username": "admin", "password": "secret"}}
    data.setdefault(setting.section, {})[setting.name] = value
    return data


@pytest.mark.parametrize("setting", STRING_SETTINGS, ids=lambda s: s.key)
def test_injection_refused_in_every_string_setting(tmp_path, setting):
    # Sanity: the surrounding file is valid, so a refusal is about the value.
    good = GOOD_VALUES.get(setting.key, setting.default)
    settings.parse(_config_with(setting, good), str(tmp_path / "deploy.toml"))
    for payload in PAYLOADS:
        if setting.key in INI_ONLY and payload in INI_HARMLESS:
            continue
        with pytest.raises(ConfigError) as info:
            settings.parse(_config_with(setting, payload), str(tmp_path / "deploy.toml"))
        assert setting.key in str(info.value)


def test_space_refused_where_not_a_separator(tmp_path):
    for setting in STRING_SETTINGS:
        if setting.key == "nginx.server_name":  # names are space-separated by design
            continue
        with pytest.raises(ConfigError):
            settings.parse(_config_with(setting, "x y"), str(tmp_path / "deploy.toml"))


@pytest.mark.parametrize("payload", PAYLOADS + ["x y"])
def test_injection_refused_in_tables_and_lists(tmp_path, payload):
    path = str(tmp_path / "deploy.toml")
    base = {"app": {"name": "wiki", "wsgi": "a:b"}}
    cases = [
        {"nginx": {"static": {"/static/": payload}}},
        {"nginx": {"static": {"/s%s/" % payload: "static"}}},
        {"recycle": {"watch": [payload]}},
        {"app": {"name": "wiki", "wsgi": "a:b", "environment": {payload: "v"}}},
    ]
    if any(c in payload for c in "\r\n\t"):
        cases.append({"app": {"name": "wiki", "wsgi": "a:b", "environment": {"K": payload}}})
    for case in cases:
        with pytest.raises(ConfigError):
            settings.parse({**base, **case}, path)


def test_runtime_dir_resolving_to_unsafe_path_is_refused(tmp_path):
    odd = tmp_path / "with space"
    odd.mkdir()
    with pytest.raises(ConfigError) as info:
        settings.load(write(odd, MINIMAL))
    assert "runtime.dir" in str(info.value) or "app.directory" in str(info.value)


def test_cross_setting_rules_run_in_load_for_every_command(tmp_path):
    """The rules across settings are part of settings.load, which every command,
    the worker and the listener call (not only render)."""
    message = load_error(tmp_path, MINIMAL + '[workers]\ncount = 2\nthreads = 1\n'
                                             '[nginx]\nkeepalive = 2\n')
    assert "nginx.keepalive = 2" in message
    message = load_error(tmp_path, MINIMAL + '[workers]\nsocket = "tcp://127.0.0.1:9009"\n'
                                             'socket_owner = "www-data"\n')
    assert "workers.socket_owner = 'www-data'" in message


def test_hard_rss_ceiling_is_off_by_default_and_must_be_above_max_rss(tmp_path):
    assert settings.load(write(tmp_path, MINIMAL)).limits.max_rss_hard == 0
    dep = settings.load(write(tmp_path, MINIMAL + '[limits]\nmax_rss = "80MB"\n'
                              'max_rss_hard = "120MB"\n'))
    assert dep.limits.max_rss_hard == 120 * 1024 * 1024
    message = load_error(tmp_path, MINIMAL + '[limits]\nmax_rss = "80MB"\nmax_rss_hard = "80MB"\n')
    assert "limits.max_rss_hard = 80MB" in message and "above limits.max_rss (80MB)" in message
    message = load_error(tmp_path, MINIMAL + '[limits]\nmax_rss_hard = "80MB"\n')
    assert "limits.max_rss_hard = 80MB" in message and "(off)" in message
