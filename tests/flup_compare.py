"""Which worker conformance cases does bare flup6 fail?  (Keeps the fixes in
``fcgi_toolkit/flupfix/`` justified when flup6 is upgraded; the bugs are
catalogued in ``docs/flup6-bugs.rst``.)

    python tests/flup_compare.py table      # run the cases against both, print a table
    python tests/flup_compare.py serve -c DEPLOY
                                             # bare flup6 WSGIServer on fd 0 (used by
                                             # tests/fcgiclient.py when FCGI_TOOLKIT_SERVER=flup)

``table`` runs ``tests/test_worker_conformance.py`` twice with pytest, once
against ``fcgi-toolkit worker`` and once against bare flup6
(FCGI_TOOLKIT_SERVER=flup), and prints one line per case.  Every case bounds
its own socket operations; each pytest run also has a hard timeout.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
CASES = os.path.join(HERE, "test_worker_conformance.py")


def serve(deploy: str) -> int:
    """Bare flup6, configured as a flup user would under supervisord: the app
    from the deploy file, thread pool of ``workers.threads``, flup's defaults
    otherwise (debug=True included)."""
    sys.path.insert(0, ROOT)
    from fcgi_toolkit import settings
    from fcgi_toolkit.worker import load_application

    dep = settings.load(deploy)
    os.environ.update(dep.app.environment)
    os.chdir(dep.app.directory)
    sys.path.insert(0, dep.app.directory)
    app = load_application(dep.app.wsgi)
    from flup.server.fcgi import WSGIServer
    threads = dep.workers.threads
    WSGIServer(app, minSpare=threads, maxSpare=threads, maxThreads=threads).run()
    return 0


def _outcomes(kind: str, timeout: float) -> dict:
    env = dict(os.environ, FCGI_TOOLKIT_SERVER=kind)
    with tempfile.TemporaryDirectory() as tmp:
        xml = os.path.join(tmp, "junit.xml")
        try:
            subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                            "--junitxml", xml, CASES], cwd=ROOT, env=env, timeout=timeout,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        except subprocess.TimeoutExpired:
            return {}
        if not os.path.exists(xml):
            return {}
        out = {}
        for case in ET.parse(xml).getroot().iter("testcase"):
            if case.find("skipped") is not None:
                result = "skip"
            elif case.find("failure") is not None or case.find("error") is not None:
                result = "FAIL"
            else:
                result = "pass"
            out[case.get("name")] = result
        return out


def table(timeout: float) -> int:
    ours = _outcomes("ours", timeout)
    flup = _outcomes("flup", timeout)
    names = list(dict.fromkeys(list(ours) + list(flup)))
    width = max([len(n) for n in names] + [10])
    print("%-*s  %-6s  %-6s" % (width, "case", "ours", "flup6"))
    for name in names:
        print("%-*s  %-6s  %-6s" % (width, name, ours.get(name, "-"), flup.get(name, "-")))
    fixed = sum(1 for n in names if ours.get(n) == "pass" and flup.get(n) == "FAIL")
    print("\n%d case(s); bare flup6 fails %d that the fixed worker passes" % (len(names), fixed))
    return 0 if all(v in ("pass", "skip") for v in ours.values()) and ours else 1


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("serve")
    p.add_argument("-c", "--config", required=True)
    p = sub.add_parser("table")
    p.add_argument("--timeout", type=float, default=900.0, help="hard limit per pytest run")
    args = parser.parse_args(argv)
    if args.cmd == "serve":
        return serve(args.config)
    return table(args.timeout)


if __name__ == "__main__":
    sys.exit(main())
