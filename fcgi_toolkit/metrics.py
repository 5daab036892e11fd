"""``fcgi-toolkit metrics``: Prometheus metrics of the group, read at scrape time.

Run by supervisord as ``[program:NAME_metrics]`` when ``metrics.listen`` is
set.  Nothing is sampled in the background: each scrape asks supervisord
(XML-RPC on the private unix socket), reads the scoreboard and the watchdog's
state file and probes each worker with psutil, through the same
:func:`fcgi_toolkit.status.gather` that ``fcgi-toolkit status`` uses, so the
two never disagree.  The listener only binds loopback addresses: the series
name every URL being served, which is not for the network at large.

Series (``worker`` is the slot's process name, e.g. ``wiki_00``):

``fcgi_up``                                1 if supervisord answered this scrape
``fcgi_workers_count``                     configured ``workers.count``
``fcgi_workers_ready``                     workers accepting requests now
``fcgi_worker_ready{worker}``              1 if that worker accepts requests now
``fcgi_worker_state{worker,state}``        1 for the slot's current state (see ``status``)
``fcgi_worker_rss_bytes{worker}``          resident memory (running workers)
``fcgi_worker_requests_total{worker}``     requests completed in this worker life
``fcgi_worker_age_seconds{worker}``        seconds since this worker process started
``fcgi_worker_inflight_seconds{worker}``   age of its oldest in-flight request (0 when idle)
``fcgi_recycles_total{worker,reason}``     recycles by the watchdog, by reason (rss, requests,
                                           age, request_timeout, operator, reload, ...)
"""
from __future__ import annotations

import argparse
import errno
import logging
import signal
import sys
import time
import xmlrpc.client
from typing import TYPE_CHECKING, Any, Callable, Iterable, Optional

from fcgi_toolkit import lifeline, supervisord
from fcgi_toolkit import status as status_mod
from fcgi_toolkit.converters import loopback_address

if TYPE_CHECKING:
    from fcgi_toolkit.settings import Deployment

log = logging.getLogger("fcgi_toolkit.metrics")


class GroupCollector:
    """A prometheus_client collector: every scrape gathers a fresh status."""

    def __init__(self, dep: "Deployment", rpc_factory: Callable[[], Any],
                 gather: Callable[..., "status_mod.GroupStatus"] = status_mod.gather,
                 clock: Callable[[], float] = time.time):
        self.dep = dep
        self._rpc_factory = rpc_factory
        self._gather = gather
        self._clock = clock

    def describe(self) -> Iterable:
        # No fixed description: registering must not trigger a scrape.
        return []

    def collect(self) -> Iterable:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        up = GaugeMetricFamily("fcgi_up", "1 if supervisord answered this scrape")
        count = GaugeMetricFamily("fcgi_workers_count", "Configured workers.count")
        count.add_metric([], self.dep.workers.count)
        try:
            group = self._gather(self.dep, self._rpc_factory(), now=self._clock())
        except (status_mod.SupervisorUnavailable, xmlrpc.client.Fault) as exc:
            log.warning("scrape without supervisord: %s", exc)
            up.add_metric([], 0)
            yield up
            yield count
            return
        up.add_metric([], 1)
        yield up
        yield count

        ready = GaugeMetricFamily("fcgi_workers_ready", "Workers accepting requests now")
        ready.add_metric([], group.ready)
        yield ready
        generation = GaugeMetricFamily("fcgi_generation", "The serving generation of the group")
        generation.add_metric([], group.generation)
        yield generation
        switching = GaugeMetricFamily("fcgi_generation_switch",
                                      "1 while a generation switch is under way")
        switching.add_metric([], 1 if group.switch else 0)
        yield switching

        worker_ready = GaugeMetricFamily("fcgi_worker_ready",
                                         "1 if the worker accepts requests now", labels=["worker"])
        state = GaugeMetricFamily("fcgi_worker_state", "1 for the slot's current state",
                                  labels=["worker", "state"])
        rss = GaugeMetricFamily("fcgi_worker_rss_bytes", "Resident memory of the worker",
                                labels=["worker"])
        requests = CounterMetricFamily("fcgi_worker_requests",
                                       "Requests completed in this worker life", labels=["worker"])
        age = GaugeMetricFamily("fcgi_worker_age_seconds",
                                "Seconds since the worker process started", labels=["worker"])
        inflight = GaugeMetricFamily("fcgi_worker_inflight_seconds",
                                     "Age of the worker's oldest in-flight request (0 when idle)",
                                     labels=["worker"])
        recycles = CounterMetricFamily("fcgi_recycles", "Recycles by the watchdog, by reason",
                                       labels=["worker", "reason"])
        for w in group.workers:
            worker_ready.add_metric([w.name], 1 if w.serving else 0)
            for name in status_mod.STATES:
                state.add_metric([w.name, name], 1 if w.state == name else 0)
            if w.rss_bytes is not None:
                rss.add_metric([w.name], w.rss_bytes)
            if w.requests is not None:
                requests.add_metric([w.name], w.requests)
                inflight.add_metric([w.name], w.inflight.seconds if w.inflight else 0.0)
            if w.age_seconds is not None:
                age.add_metric([w.name], w.age_seconds)
            counted = 0
            for reason, n in sorted(w.by_reason.items()):
                recycles.add_metric([w.name, reason], n)
                counted += n
            if w.recycles > counted:
                # A state file without a by_reason breakdown still counts.
                recycles.add_metric([w.name, "unknown"], w.recycles - counted)
        drift = GaugeMetricFamily("fcgi_config_drift",
                                  "1 for each key the deployment file changed since run/apply",
                                  labels=["key"])
        for key in group.drift or ():
            drift.add_metric([key], 1)
        yield from (worker_ready, state, rss, requests, age, inflight, recycles, drift)


def make_registry(collector: GroupCollector) -> Any:
    """A registry holding only the group's collector (no process/platform series)."""
    from prometheus_client import CollectorRegistry
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    return registry


# --------------------------------------------------------------------------
# Command
# --------------------------------------------------------------------------

def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-c", "--config", default="deploy.toml",
                        help="deployment file (default: deploy.toml)")
    from fcgi_toolkit import settings
    settings.add_start_from(parser)


class _Stop:
    """Set by SIGTERM/SIGINT; the main loop does the rest."""
    requested = False

    @classmethod
    def handler(cls, signum: int, frame: Optional[object]) -> None:
        cls.requested = True


def run(args: argparse.Namespace) -> int:
    from fcgi_toolkit import settings
    logging.basicConfig(stream=sys.stderr, level=logging.INFO,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    dep = settings.load(args.config, source=args.start_from)
    try:
        host, port = loopback_address(dep.metrics.listen)
    except ValueError as exc:
        raise settings.ConfigError("%s: metrics.listen = %r: %s"
                                   % (dep.path, dep.metrics.listen, exc)) from None

    from prometheus_client import start_http_server
    from fcgi_toolkit import generations
    # Each scrape asks the supervisord holding the serving generation's workers.
    registry = make_registry(GroupCollector(
        dep, lambda: supervisord.control_proxy(generations.serving(dep))))
    signal.signal(signal.SIGTERM, _Stop.handler)
    signal.signal(signal.SIGINT, _Stop.handler)
    lifeline.guard(signal.SIGTERM, dep.supervisord_pidfile)   # supervisord's death stops us too
    try:
        server, thread = start_http_server(port, addr=host, registry=registry)
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            log.error("cannot serve metrics on %s: address already in use", dep.metrics.listen)
        else:
            log.error("cannot serve metrics on %s: %s", dep.metrics.listen, exc)
        return 1
    log.info("serving metrics of %s on http://%s/metrics", dep.name, dep.metrics.listen)
    while not _Stop.requested:
        time.sleep(0.2)
    server.shutdown()
    server.server_close()
    thread.join(5)
    log.info("metrics stopped")
    return 0
