"""Quick worker throughput check: ``fcgi-toolkit worker`` vs bare flup6 (vs uWSGI).

For fast iterations on the worker's request path, without supervisord or
the watchdog: each contender's workers are started directly on one shared
listening unix socket (as supervisord's ``[fcgi-program]`` would hand it to
them on fd 0), behind the bench's nginx, loaded with wrk.  Rounds are
interleaved (ours, flup, uwsgi, ours, ...) so a noisy neighbour hits all
alike.  Prints median req/s per contender and the ratios against bare
flup6; asserts nothing.  ``python -m bench.run --scenario throughput`` is the
full, reported measurement.

    python -m bench.worker_vs_flup [--app hello] [--workers 2] [--threads 1]
        [--seconds 3] [--rounds 3] [--connections 8] [--contenders ours,flup,uwsgi]
        [--profile SECONDS] [--keep-conn]

``--profile N`` records one of our workers with py-spy for N seconds under
load (if py-spy is installed) and prints its top functions.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from typing import Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from bench import wrk  # noqa: E402
from bench.contenders import Spec, Uwsgi, tool  # noqa: E402
from bench.nginx import Nginx, free_port  # noqa: E402

APPS = {"hello": "bench.apps:hello", "cpu": "bench.apps:cpu"}


class DirectWorkers:
    """``n`` worker processes sharing one listening unix socket on fd 0."""

    def __init__(self, workdir: str, kind: str, app: str, n: int, threads: int):
        self.workdir = workdir
        self.kind = kind
        self.socket_path = os.path.join(workdir, "app.sock")
        self.procs: list = []
        os.makedirs(workdir, exist_ok=True)
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(self.socket_path)
        self.listener.listen(128)
        if kind == "ours":
            deploy = os.path.join(workdir, "deploy.toml")
            with open(deploy, "w") as f:
                f.write("\n".join([
                    "[app]", 'name = "bench"', "wsgi = %s" % json.dumps(app),
                    "directory = %s" % json.dumps(ROOT),
                    "[workers]", "count = %d" % n, "standby = 0", "threads = %d" % threads,
                    'graceful_timeout = "5s"',
                    "[runtime]", "dir = %s" % json.dumps(os.path.join(workdir, "rt")), ""]))
            cmds = [[sys.executable, "-m", "fcgi_toolkit", "worker", "-c", deploy, "--slot", str(i)]
                    for i in range(n)]
        else:
            cmds = [[sys.executable, "-m", "bench.flup_worker", app] for _ in range(n)]
        env = dict(os.environ, PYTHONPATH=ROOT)
        for i, cmd in enumerate(cmds):
            log = open(os.path.join(workdir, "worker-%d.log" % i), "wb")
            self.procs.append(subprocess.Popen(cmd, stdin=self.listener.fileno(), stdout=log,
                                               stderr=subprocess.STDOUT, env=env, cwd=ROOT,
                                               start_new_session=True))
            log.close()

    @property
    def pids(self) -> list:
        return [p.pid for p in self.procs]

    def stop(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(8)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)
        self.listener.close()


class UwsgiWorkers:
    def __init__(self, workdir: str, app: str, n: int, threads: int):
        os.makedirs(workdir, exist_ok=True)
        self.contender = Uwsgi(workdir, Spec(app=app, workers=n, threads=threads))
        self.contender.start(60)
        self.socket_path = self.contender.socket_path

    @property
    def pids(self) -> list:
        return self.contender.worker_pids()

    def stop(self) -> None:
        self.contender.stop()


def cpu_seconds(pids: list) -> float:
    """User + system CPU seconds the processes used so far."""
    import psutil
    total = 0.0
    for pid in pids:
        try:
            t = psutil.Process(pid).cpu_times()
        except psutil.Error:
            continue
        total += t.user + t.system
    return total


def wait_serving(url: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1].strip("/"))),
                                          timeout=2) as s:
                s.sendall(b"GET / HTTP/1.0\r\nHost: x\r\n\r\n")
                if s.recv(12).startswith(b"HTTP/1.1 200"):
                    return
        except OSError:
            pass
        time.sleep(0.1)
    raise RuntimeError("%s does not answer 200" % url)


def profile(pid: int, url: str, seconds: float, connections: int, out: str) -> Optional[str]:
    spy = shutil.which("py-spy")
    if not spy:
        return "py-spy is not installed"
    load = wrk.start(url, seconds + 2, connections)
    try:
        subprocess.run([spy, "record", "-p", str(pid), "-d", str(int(seconds)), "-f", "raw",
                        "-o", out, "-r", "500", "--nonblocking"],
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=seconds + 30)
    finally:
        wrk.finish(load, seconds + 2)
    own, total = {}, 0
    with open(out) as f:
        for line in f:
            stack, _, count = line.rstrip().rpartition(" ")
            n = int(count)
            total += n
            for frame in set(stack.split(";")):
                own[frame] = own.get(frame, 0) + n
    rows = sorted(own.items(), key=lambda kv: -kv[1])[:40]
    return "\n".join("%5.1f%%  %s" % (100.0 * n / total, frame) for frame, n in rows)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.worker_vs_flup", description=__doc__.splitlines()[0])
    p.add_argument("--app", choices=sorted(APPS), default="hello")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--threads", type=int, default=1, help="our worker's threads (flup: unbounded pool)")
    p.add_argument("--seconds", type=float, default=3.0)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--connections", type=int, default=8)
    p.add_argument("--contenders", default="ours,flup,uwsgi")
    p.add_argument("--profile", type=float, default=0.0, metavar="SECONDS")
    p.add_argument("--keep-conn", action="store_true",
                   help="fastcgi_keep_conn on without upstream keepalive, as the rendered "
                        "nginx site has it (nginx closes after each response)")
    args = p.parse_args(argv)
    if not wrk.available():
        print("wrk is not installed", file=sys.stderr)
        return 2
    kinds = [k.strip() for k in args.contenders.split(",") if k.strip()]
    if "uwsgi" in kinds and not tool("uwsgi"):
        print("uwsgi not found next to %s: skipped (run with bench/.venv/bin/python)" % sys.executable)
        kinds.remove("uwsgi")
    app = APPS[args.app]
    if args.keep_conn:
        import bench.nginx
        plain = bench.nginx.render

        def render(*a, **kw):
            return plain(*a, **kw).replace("fastcgi_pass app;", "fastcgi_keep_conn on;\n      fastcgi_pass app;")
        bench.nginx.render = render
    root = tempfile.mkdtemp(prefix="fcgiquick-", dir="/tmp")
    stacks = []
    try:
        for kind in kinds:
            workdir = os.path.join(root, kind)
            if kind == "uwsgi":
                workers = UwsgiWorkers(workdir, app, args.workers, args.threads)
            else:
                workers = DirectWorkers(workdir, kind, app, args.workers, args.threads)
            nginx = Nginx(workdir, free_port())
            stacks.append((kind, workers, nginx))
            nginx.start(workers.socket_path)
            wait_serving(nginx.url)
        for _, _, nginx in stacks:
            wrk.run(nginx.url, 1, args.connections)   # warm-up
        runs: dict = {kind: [] for kind, _, _ in stacks}
        cpu: dict = {kind: [0.0, 0] for kind, _, _ in stacks}
        for _ in range(args.rounds):
            for kind, workers, nginx in stacks:
                before = cpu_seconds(workers.pids)
                r = wrk.run(nginx.url, args.seconds, args.connections)
                cpu[kind][0] += cpu_seconds(workers.pids) - before
                cpu[kind][1] += r.requests
                runs[kind].append(r)
        if args.profile:
            for kind, workers, nginx in stacks:
                if kind == "ours":
                    print(profile(workers.pids[0], nginx.url, args.profile, args.connections,
                                  os.path.join(root, "profile.txt")))
    finally:
        for _, workers, nginx in stacks:
            try:
                nginx.stop()
            finally:
                workers.stop()
        shutil.rmtree(root, ignore_errors=True)
    med = {}
    for kind, rs in runs.items():
        rates = sorted(r.rps for r in rs)
        med[kind] = rates[len(rates) // 2]
        failed = sum(r.failed for r in rs)
        spent, count = cpu[kind]
        print("%-6s %8.0f req/s median of %s  p50 %.2f ms  failed %d  worker CPU %.0f us/request"
              % (kind, med[kind], ["%.0f" % x for x in rates],
                 sorted(r.p50 for r in rs)[len(rs) // 2] * 1e3, failed,
                 1e6 * spent / count if count else 0.0))
    for base in ("flup", "uwsgi"):
        if med.get(base) and "ours" in med:
            print("ratio ours/%s: %.3f" % (base, med["ours"] / med[base]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
