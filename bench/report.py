"""results.json and results.md from the scenario results of one run."""
from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from typing import Optional

GOALS = (
    "zero failed requests for our recycle storm, rolling reload and leak capping",
    "our worker's throughput at least 0.97 of bare flup6 on the same app",
    "the listener under 2% of one core for 16 workers",
)


def _version(cmd: list) -> str:
    try:
        out = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             timeout=10).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return "not installed"
    return out.splitlines()[0] if out else "?"


def _pkg(name: str) -> str:
    from importlib import metadata
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "not installed"


def environment() -> dict:
    """Date, machine and versions: what a reader needs to weigh the numbers."""
    from bench.contenders import tool
    cpu = platform.processor() or "?"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    return {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "machine": "%s, %d cores, %s" % (cpu, os.cpu_count() or 0, platform.platform()),
        "python": sys.version.split()[0],
        "fcgi-toolkit": _pkg("fcgi-toolkit"),
        "flup6": _pkg("flup6"),
        "supervisor": _pkg("supervisor"),
        "superlance": _pkg("superlance"),
        "uwsgi": _version([tool("uwsgi") or "uwsgi", "--version"]),
        "gunicorn": _pkg("gunicorn"),
        "nginx": _version(["nginx", "-v"]),
        "wrk": _version(["wrk", "-v"]).split(" Copyright")[0],
    }


def _cell(value, fmt: str) -> str:
    if value is None:
        return "-"
    if fmt == "s":
        return str(value)
    try:
        return format(value, fmt)
    except (TypeError, ValueError):
        return str(value)


def table(result: dict) -> str:
    cols = result["columns"]
    lines = ["| " + " | ".join(c[1] for c in cols) + " |",
             "|" + "|".join("---" for _ in cols) + "|"]
    for row in result["rows"]:
        lines.append("| " + " | ".join(_cell(row.get(c[0]), c[2]) for c in cols) + " |")
    return "\n".join(lines)


def markdown(doc: dict) -> str:
    env = doc["environment"]
    out = ["# fcgi-toolkit benchmark results", "",
           "Run %s on %s." % (env["date"], env["machine"]), "",
           "Versions: " + ", ".join("%s %s" % (k, env[k]) for k in
                                    ("python", "fcgi-toolkit", "flup6", "supervisor", "superlance",
                                     "uwsgi", "gunicorn", "nginx", "wrk")) + ".", "",
           "Command: `%s`%s. Every ratio is against the baseline named in its column, "
           "measured in the same run." % (doc["command"], " (smoke: seconds, not comparable)"
                                          if doc["smoke"] else ""), ""]
    for res in doc["scenarios"]:
        out += ["## %s" % res["title"], ""]
        if res.get("error"):
            out += ["**Scenario failed:** %s" % res["error"], ""]
        if res["rows"]:
            out += [table(res), ""]
        for note in res["notes"]:
            out.append("- %s" % note)
        for label, why in res["skipped"].items():
            out.append("- skipped %s: %s" % (label, why))
        out += ["- took %.0f s" % res["seconds"], ""]
        for png in res.get("plots", []):
            out += ["![%s](%s)" % (res["title"], png), ""]
    out += ["## Goals of issue #5", ""]
    for goal, verdict in doc.get("goals", {}).items():
        out.append("- %s: **%s**" % (goal, verdict))
    return "\n".join(out) + "\n"


def verdicts(scenarios: list) -> dict:
    """Each goal of issue #5 judged from this run's numbers (or 'not measured')."""
    by = {s["name"]: s for s in scenarios}
    out = {}

    def rows(name: str, prefix: str) -> list:
        return [r for r in by.get(name, {}).get("rows", []) if r["contender"].startswith(prefix)]

    ours = rows("recycle", "ours") + rows("reload", "ours") + rows("leak", "ours")
    if len(ours) == 3:
        failed = sum(r["failed"] for r in ours)
        out[GOALS[0]] = "met (0 failed)" if failed == 0 else "NOT met (%d failed)" % failed
    else:
        out[GOALS[0]] = "not measured (%d of 3 scenarios ran ours)" % len(ours)
    tp = [r for r in by.get("throughput", {}).get("rows", []) if r["contender"] == "ours"]
    if tp and all(r.get("ratio") is not None for r in tp):
        worst = min(r["ratio"] for r in tp)
        out[GOALS[1]] = ("met" if worst >= 0.97 else "NOT met") + " (worst ratio %.3f)" % worst
    else:
        out[GOALS[1]] = "not measured"
    lst = rows("watchdog", "ours listener")
    if lst:
        pct = lst[0]["cpu_pct"]
        out[GOALS[2]] = ("met" if pct < 2.0 else "NOT met") + " (%.3f%%)" % pct
    else:
        out[GOALS[2]] = "not measured"
    return out


def write(out_dir: str, doc: dict) -> tuple[str, str]:
    os.makedirs(out_dir, exist_ok=True)
    doc["goals"] = verdicts(doc["scenarios"])
    json_path = os.path.join(out_dir, "results.json")
    md_path = os.path.join(out_dir, "results.md")
    tmp = json_path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(doc, f, indent=1, sort_keys=False, default=str)
    os.replace(tmp, json_path)
    with open(md_path, "w") as f:
        f.write(markdown(doc))
    return json_path, md_path


def load(out_dir: str) -> Optional[dict]:
    try:
        with open(os.path.join(out_dir, "results.json")) as f:
            return json.load(f)
    except FileNotFoundError:
        return None
