"""The built wheel carries the templates: build it, install it into a fresh
venv, render from there (outside the checkout) and check the result."""
from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys
import zipfile

import pytest

from fcgi_toolkit import render
from harness import venv_with_this_env

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOURCES = ("fcgi_toolkit", "templates", "setup.cfg", "pyproject.toml", "README.rst")


def run(cmd, **kwargs) -> subprocess.CompletedProcess:
    r = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=300, **kwargs)
    assert r.returncode == 0, "%s\n%s\n%s" % (" ".join(map(str, cmd)), r.stdout[-3000:], r.stderr[-3000:])
    return r


@pytest.fixture(scope="module")
def venv(tmp_path_factory):
    base = tmp_path_factory.mktemp("wheel")
    # Build from a copy: building in the checkout would leave build/ and egg-info behind.
    src = base / "src"
    src.mkdir()
    for name in SOURCES:
        from_ = os.path.join(REPO, name)
        if os.path.isdir(from_):
            shutil.copytree(from_, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy(from_, src / name)
    dist = base / "dist"
    run([sys.executable, "-m", "build", "--wheel", "--outdir", str(dist), str(src)])
    (wheel,) = glob.glob(str(dist / "*.whl"))
    env_dir = base / "venv"
    # pip from the running interpreter installs into the new venv's prefix,
    # so that the wheel comes before tox's copy on sys.path.
    python = venv_with_this_env(str(env_dir), lambda python: run(
        [sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "--no-index",
         wheel]))
    return {"python": python, "wheel": wheel, "dir": str(env_dir), "base": base}


def test_wheel_contains_the_templates(venv):
    names = zipfile.ZipFile(venv["wheel"]).namelist()
    included = ("supervisord-programs.conf.j2", "supervisord-fragment.conf.j2",
                "supervisorctl.conf.j2", "systemd.service.j2")   # install's and the include
    for template in tuple(render.FILES.values()) + included:
        assert "fcgi_toolkit/templates/%s" % template in names


def test_installed_package_renders_from_its_own_templates(venv):
    work = venv["base"] / "work"
    work.mkdir()
    r = run([venv["python"], "-c", "import fcgi_toolkit.render as r; print(r.__file__); "
                                   "print(r.builtin_template_dir())"], cwd=str(work))
    module_file, template_dir = r.stdout.split()
    assert module_file.startswith(venv["dir"]), "the venv's copy is imported, not the checkout"
    assert template_dir.startswith(venv["dir"]) and os.path.isfile(
        os.path.join(template_dir, "supervisord.conf.j2"))

    (work / "deploy.toml").write_text('[app]\nname = "wiki"\nwsgi = "wikiapp:application"\n')
    script = os.path.join(venv["dir"], "bin", "fcgi-toolkit")
    run([script, "render", "-c", "deploy.toml", "-o", "out"], cwd=str(work))
    conf = (work / "out" / "supervisord.conf").read_text()
    assert "[fcgi-program:wiki]" in conf
    assert "command=%s -m fcgi_toolkit worker" % venv["python"] in conf

    from supervisor.options import FastCGIGroupConfig, ServerOptions
    os.makedirs(work / ".fcgi-toolkit" / "wiki" / "log")
    options = ServerOptions()
    options.realize(args=["-c", str(work / "out" / "supervisord.conf")])
    assert any(type(g) is FastCGIGroupConfig for g in options.process_group_configs)

    nginx = render.find_nginx()
    if nginx:
        r = subprocess.run([nginx, "-t", "-c", str(work / "out" / "nginx.conf")],
                           capture_output=True, text=True, timeout=30)
        assert r.returncode == 0, r.stderr
