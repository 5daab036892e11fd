"""``fcgi-toolkit status``: one row per worker slot, from three sources.

A slot's view joins what supervisord says about the process (XML-RPC
``getAllProcessInfo``), what the worker says about itself (its scoreboard
slot, trusted only when :func:`fcgi_toolkit.scoreboard.is_live` matches pid
and start time) and what the watchdog remembers about it (the state file).

The decisions are pure: :func:`derive_state` and :func:`worker_view` take
plain values (the watchdog sampler's frozen ``SlotSnapshot`` and the state
file's dict), :func:`group_status` joins them, and the formatters turn a
:class:`GroupStatus` into text or a JSON object.  :func:`gather` is the
thin I/O shell (RPC, the watchdog's sampler, state file) shared by the
``status`` command, the supervisorctl plugin and the metrics collector.

``status --json`` prints this object (stable; new keys may be added)::

    {"group": "wiki",            # the serving generation's group: app.name, or wiki_g2...
     "count": 2,                 # workers.count
     "standby": 1,               # workers.standby (configured standby slots)
     "ready": 2,                 # workers accepting requests now
     "recycles": 3,              # recycles of the group, every slot, every life
     "generated_at": 1767225600.0,
     "drift": ["limits.max_requests"],   # keys the file changed since run/apply
                                         # ([] none; null unknown: no snapshot)
     "generation": 1,            # the serving generation (README "Generations")
     "switch": null,             # a switch under way: {"old": 1, "new": 2,
                                 #   "phase": "starting", "since": 1767225600.0,
                                 #   "supervisord": 0}  (the new one's holder)
     "supervisord": {"generation": 0,   # who holds the workers: 0 the front (run's),
                     "program": null,   #   N the inner one generation N started ("wiki_s3")
                     "conf": "/srv/wiki/run/supervisord.conf"},   # supervisorctl -c CONF
     "workers": [
       {"name": "wiki_00",
        "state": "busy",         # see STATES
        "supervisor_state": "RUNNING",
        "pid": 4242,             # null when not running
        "rss_bytes": 31457280,   # null when unknown
        "requests": 17,          # completed this life; null when unknown
        "age_seconds": 73.5,     # since the process started; null when not running
        "inflight": {"method": "GET", "uri": "/slow?s=5", "seconds": 2.1},  # or null
        "recycles": 1,
        "last_reason": "requests 1043 >= 1021",   # or null
        "last_recycle_time": 1767225500.0}]}      # or null

On the web server of a multi-host deployment (``[[hosts]]``, no
FCGI_TOOLKIT_HOST) ``status`` asks every host's supervisord over its TCP
control port (control.inet_port with control.username/password) for its
own status, ``fcgi.status()`` of our RPC plugin (:mod:`fcgi_toolkit.rpcinterface`):
every worker in full, as on the host.  A host without the plugin shows
supervisord's view only (state, pid, uptime; RSS, requests, in-flight
request and recycles null).  A host that does not answer is "down";
the exit status is then 1.  ``--json``::

    {"group": "wiki",
     "generated_at": 1767225600.0,
     "up": 2,                    # hosts that answered
     "down": ["app2"],           # hosts that did not
     "rollout": null,            # apply's rollout under way: {"host": "app1",
                                 # "phase": "restarting", "done": [], "since": T}
     "hosts": [
       {"name": "app1",
        "address": "10.0.0.11:9000",          # the host's worker socket
        "control_url": "http://10.0.0.11:9001",
        "backup": false,
        "up": true,
        "error": null,           # why the host is down, else null
        "count": 8,              # the host's workers.count
        "standby": 1,
        "running": 8,            # workers RUNNING in supervisord
        "workers": [...]},       # as above; state "running" (readiness is not
                                 # known remotely), unknown values null
       {"name": "app2", ..., "up": false,
        "error": "connection refused at http://10.0.0.12:9001 ...", "running": 0, "workers": []}]}
"""
from __future__ import annotations

import argparse
import json
import sys
import xmlrpc.client
from typing import TYPE_CHECKING

from fcgi_toolkit.names import format_duration, format_size
from fcgi_toolkit.status_hosts import (HOST_TIMEOUT, DeploymentStatus, HostStatus, control_url,
                                       gather_hosts, host_down, host_status, query_host,
                                       remote_worker_view, require_host_control,
                                       unreachable_reason)
from fcgi_toolkit.status_local import (STATES, GroupStatus, Inflight, SupervisorUnavailable,
                                       WorkerView, derive_state, gather, group_status,
                                       worker_view)
from fcgi_toolkit.status_output import (REMOTE_NOTE, format_hosts_table, format_table,
                                        hosts_summary_line, hosts_to_json, summary_line, to_json)

if TYPE_CHECKING:
    from fcgi_toolkit.settings import Deployment

__all__ = ["STATES", "REMOTE_NOTE", "HOST_TIMEOUT", "DeploymentStatus", "GroupStatus",
           "HostStatus", "Inflight", "SupervisorUnavailable", "WorkerView", "control_url",
           "derive_state", "format_duration", "format_size", "format_hosts_table",
           "format_table", "gather", "gather_hosts", "group_status", "host_down", "host_status",
           "hosts_summary_line", "hosts_to_json", "query_host", "remote_worker_view",
           "require_host_control", "summary_line", "to_json", "unreachable_reason",
           "worker_view"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-c", "--config", default="deploy.toml",
                        help="deployment file (default: deploy.toml)")
    parser.add_argument("--json", action="store_true",
                        help="print one JSON object (documented in README: Operator commands)")
    parser.add_argument("--timeout", type=float, default=HOST_TIMEOUT, metavar="SECONDS",
                        help="with [[hosts]], on the web server: how long each host's supervisord "
                             "has to answer (default: %(default)gs)")


def run(args: argparse.Namespace) -> int:
    """Exit status: 0 shown; 1 supervisord (or, on a multi-host web
    server, any host) did not answer; 2 bad deployment file."""
    from fcgi_toolkit import generations, settings, supervisord
    dep = settings.load(args.config)
    if dep.multi_host and dep.host is None:
        return run_hosts(dep, args.json, args.timeout)
    dep = generations.serving(dep)      # its workers' supervisord: the front or an inner one
    try:
        status = gather(dep, supervisord.control_proxy(dep))
    except SupervisorUnavailable as exc:
        print("fcgi-toolkit: %s" % exc, file=sys.stderr)
        return 1
    except xmlrpc.client.Fault as exc:
        print("fcgi-toolkit: supervisord refused getAllProcessInfo: %s" % exc.faultString,
              file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(to_json(status), indent=2, sort_keys=False))
    else:
        sys.stdout.write(format_table(status))
    return 0


def run_hosts(dep: "Deployment", as_json: bool, timeout: float = HOST_TIMEOUT) -> int:
    """``status`` on the web server of a multi-host deployment; 1 if any host is down."""
    deployment = gather_hosts(dep, timeout=timeout)
    if as_json:
        print(json.dumps(hosts_to_json(deployment), indent=2, sort_keys=False))
    else:
        sys.stdout.write(format_hosts_table(deployment))
    for h in deployment.hosts:
        if not h.up:
            print("fcgi-toolkit: host %s is down: %s" % (h.name, h.error), file=sys.stderr)
    return 1 if deployment.down else 0
