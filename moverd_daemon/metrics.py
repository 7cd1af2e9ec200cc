"""Prometheus metrics of the daemon, fed by the same observer hooks third-party plugins implement.

:class:`Metrics` is registered on the plugin manager like any plugin (``transfer_started``,
``datablock_committed`` ...). Byte counts are read from the live :class:`~moverd.Transfer` objects
at scrape time, so ``moverd_bytes_total`` moves while a datablock is being written, not only when a
dataset ends. Slot holders/waiters come straight from the storages' :class:`~moverd.Slots`, which
is how an operator sees LTS writers queueing. Jobs are reported by the dispatcher.

Every series is in a registry of its own (not prometheus_client's global one), so that tests and
several apps in one process do not share counters.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.registry import Collector

from moverd import __version__
from moverd.events import Transfer
from moverd.hookspecs import hookimpl
from moverd.limits import Slots

KINDS = ("archive", "retrieve", "verify")
THROUGHPUT_WINDOW = 30.0
"""Seconds over which ``moverd_throughput_bytes_per_second`` is averaged."""
JOB_BUCKETS = (1, 5, 15, 60, 300, 900, 1800, 3600, 3 * 3600, 6 * 3600, 12 * 3600, 24 * 3600, 72 * 3600)

SlotsProvider = Callable[[], Iterable[tuple[str, str, Slots]]]
"""``(storage name, "read"|"write", slots)`` for every storage with bounded slots."""


class Metrics:
    """The daemon's metrics and the observer plugin that feeds them."""

    def __init__(self, slots: SlotsProvider | None = None) -> None:
        self.registry = CollectorRegistry()
        self._slots = slots or (lambda: ())
        self._lock = threading.Lock()
        self._active: dict[str, Transfer] = {}
        self._settled: dict[str, int] = dict.fromkeys(KINDS, 0)
        self._samples: deque[tuple[float, dict[str, int]]] = deque()
        r = self.registry
        self.transfers = Counter("moverd_transfers", "Dataset transfers that ended, by kind and outcome.",
                                 ["kind", "outcome"], registry=r)
        self.committed = Counter("moverd_datablocks_committed", "Datablocks written and published atomically.",
                                 ["kind"], registry=r)
        self.verified = Counter("moverd_datablocks_verified", "Datablocks read back from the medium and matched.",
                                ["kind"], registry=r)
        self.failed = Counter("moverd_datablocks_failed",
                              "Datablocks of failed transfers that were not completed.", ["kind"], registry=r)
        self.job_duration = Histogram("moverd_job_duration_seconds", "Wall time of catalog jobs, by type and status.",
                                      ["type", "status"], buckets=JOB_BUCKETS, registry=r)
        self.jobs_running = Gauge("moverd_jobs_running", "Jobs running in this daemon.", registry=r)
        self.jobs_queued = Gauge("moverd_jobs_queued", "Jobs accepted by this daemon and waiting for a slot.",
                                 registry=r)
        self.free_bytes = Gauge("moverd_storage_free_bytes", "Free bytes of a storage (when it can tell).",
                                ["storage"], registry=r)
        self.space_waiters = Gauge("moverd_storage_space_waiters",
                                   "Writes waiting for free space on a storage now.", ["storage"], registry=r)
        self.space_shortfall = Gauge("moverd_storage_space_shortfall_bytes",
                                     "Bytes missing for the longest-waiting write on a storage to start "
                                     "(needed + min_free - free); 0 when none waits.", ["storage"], registry=r)
        self._space_waits: dict[str, int] = {}
        self.taken_over = Counter("moverd_jobs_taken_over",
                                  "Orphaned jobs (their daemon died, or stopped) this daemon claimed and ran.",
                                  registry=r)
        self.restores = Counter("moverd_restores",
                                "Restores of datablocks (tape-class LTS) and HSM recalls, by storage and event: "
                                "requested by this daemon, done, timed_out, failed.", ["storage", "event"], registry=r)
        self.restores_in_progress = Gauge("moverd_restores_in_progress",
                                          "Datablocks this daemon waits to be restored or recalled now.",
                                          ["storage"], registry=r)
        self._restoring: dict[tuple[str, str], str] = {}
        self.housekeeping = Counter("moverd_housekeeping_removed",
                                    "Objects removed by housekeeping (stale temp files, expired retrievals).",
                                    ["task"], registry=r)
        self.landing = Gauge("moverd_landing_bytes",
                             "The landing zone's quota as the upload API last computed it: used (stored), "
                             "reserved (granted and not yet uploaded) and free (for new grants).",
                             ["kind"], registry=r)
        info = Gauge("moverd_build_info", "moverd version.", ["version"], registry=r)
        info.labels(version=__version__).set(1)
        for kind in KINDS:
            for outcome in ("finished", "failed"):
                self.transfers.labels(kind=kind, outcome=outcome)
            self.committed.labels(kind=kind)
            self.verified.labels(kind=kind)
            self.failed.labels(kind=kind)
        r.register(_LiveCollector(self))
        ProcessCollector(registry=r)

    # -- observer hooks (pluggy calls these by argument name) ----------------------------------

    @hookimpl
    def transfer_started(self, transfer: Transfer) -> None:
        self.track(transfer)

    @hookimpl
    def datablock_committed(self, transfer: Transfer, datablock: Any) -> None:
        self.committed.labels(kind=transfer.kind).inc()

    @hookimpl
    def datablock_verified(self, transfer: Transfer, datablock: Any) -> None:
        self.verified.labels(kind=transfer.kind).inc()

    @hookimpl
    def transfer_finished(self, transfer: Transfer) -> None:
        self.settle(transfer, "finished")

    @hookimpl
    def transfer_failed(self, transfer: Transfer, error: BaseException) -> None:
        undone = max(transfer.datablocks_total - transfer.datablocks_done, 0)
        if undone:
            self.failed.labels(kind=transfer.kind).inc(undone)
        self.settle(transfer, "failed")

    @hookimpl
    def storage_space_wait(
        self, storage: str, needed: int, free: int, min_free: int, waited: float, waiting: bool
    ) -> None:
        with self._lock:
            count = max(self._space_waits.get(storage, 0) + (1 if waiting else -1), 0)
            self._space_waits[storage] = count
        self.space_waiters.labels(storage=storage).set(count)
        if waiting:
            self.space_shortfall.labels(storage=storage).set(max(needed + min_free - free, 0))
        elif count == 0:
            self.space_shortfall.labels(storage=storage).set(0)

    @hookimpl
    def restore_changed(self, transfer: Transfer, storage: str, key: str, state: str) -> None:
        event = {"requested": "requested", "available": "done", "timed_out": "timed_out", "failed": "failed"}
        with self._lock:
            known = (storage, key) in self._restoring
            if state in ("requested", "in_progress"):
                self._restoring[(storage, key)] = state
            else:
                self._restoring.pop((storage, key), None)
            waiting = sum(1 for s, _ in self._restoring if s == storage)
        # "done" counts the restores this daemon waited for, not objects that needed none.
        if state in event and (state == "requested" or known):
            self.restores.labels(storage=storage, event=event[state]).inc()
        self.restores_in_progress.labels(storage=storage).set(waiting)

    # -- what the dispatcher reports -------------------------------------------------------------

    def track(self, transfer: Transfer) -> None:
        """Count ``transfer``'s bytes from now on (idempotent; jobs also report theirs here,
        because not every kind of transfer goes through the observer hooks)."""
        with self._lock:
            self._active.setdefault(transfer.id, transfer)

    def settle(self, transfer: Transfer, outcome: str | None = None) -> None:
        """``transfer`` ended: its bytes move from the live sum into the settled total, once."""
        with self._lock:
            if self._active.pop(transfer.id, None) is None:
                return
            self._settled[transfer.kind] = self._settled.get(transfer.kind, 0) + transfer.bytes_done
        if outcome:
            self.transfers.labels(kind=transfer.kind, outcome=outcome).inc()

    def landing_usage(self, usage: Any) -> None:
        """The landing quota as the upload API computed it last (an ``ingest.quota.Usage``)."""
        self.landing.labels(kind="used").set(usage.used)
        self.landing.labels(kind="reserved").set(usage.reserved)
        if usage.free is not None:
            self.landing.labels(kind="free").set(usage.free)

    def job_finished(self, job_type: str, status: str, seconds: float) -> None:
        self.job_duration.labels(type=job_type, status=status).observe(seconds)

    # -- reading -------------------------------------------------------------------------------

    def bytes_by_kind(self) -> dict[str, int]:
        with self._lock:
            out = dict(self._settled)
            for t in self._active.values():
                out[t.kind] = out.get(t.kind, 0) + t.bytes_done
        return out

    def sample(self) -> None:
        """Remember the byte counts now, for the throughput gauge (called on a timer and on scrape)."""
        now = time.monotonic()
        with self._lock:
            if self._samples and now - self._samples[-1][0] < 0.5:
                return
        totals = self.bytes_by_kind()
        with self._lock:
            self._samples.append((now, totals))
            while len(self._samples) > 2 and now - self._samples[1][0] >= THROUGHPUT_WINDOW:
                self._samples.popleft()

    def throughput(self) -> dict[str, float]:
        """Bytes per second over the last ~30 s, by kind."""
        self.sample()
        with self._lock:
            if len(self._samples) < 2:
                return dict.fromkeys(KINDS, 0.0)
            (t0, first), (t1, last) = self._samples[0], self._samples[-1]
        dt = max(t1 - t0, 1e-6)
        return {k: max(last.get(k, 0) - first.get(k, 0), 0) / dt for k in set(first) | set(last)}

    def slots(self) -> list[tuple[str, str, Slots]]:
        try:
            return list(self._slots())
        except Exception:
            return []

    def render(self) -> tuple[bytes, str]:
        """The exposition text and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class _LiveCollector(Collector):
    """Series computed at scrape time from live objects."""

    def __init__(self, metrics: Metrics) -> None:
        self.m = metrics

    def describe(self) -> Iterable[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        moved = CounterMetricFamily("moverd_bytes", "Payload bytes moved (file contents, not tar headers), "
                                    "including transfers still running.", labels=["kind"])
        for kind, n in sorted(self.m.bytes_by_kind().items()):
            moved.add_metric([kind], n)
        yield moved
        rate = GaugeMetricFamily("moverd_throughput_bytes_per_second",
                                 f"Payload bytes per second over the last {THROUGHPUT_WINDOW:.0f} s.", labels=["kind"])
        for kind, v in sorted(self.m.throughput().items()):
            rate.add_metric([kind], v)
        yield rate
        active = GaugeMetricFamily("moverd_transfers_active", "Dataset transfers in progress.", labels=["kind"])
        counts = dict.fromkeys(KINDS, 0)
        with self.m._lock:
            for t in self.m._active.values():
                counts[t.kind] = counts.get(t.kind, 0) + 1
        for kind, n in sorted(counts.items()):
            active.add_metric([kind], n)
        yield active
        families = {
            "holders": GaugeMetricFamily("moverd_storage_slot_holders",
                                         "Transfers inside a storage's bounded read/write section now.",
                                         labels=["storage", "kind"]),
            "waiters": GaugeMetricFamily("moverd_storage_slot_waiters",
                                         "Transfers waiting for a storage's read/write slot.",
                                         labels=["storage", "kind"]),
            "limit": GaugeMetricFamily("moverd_storage_slot_limit", "Slots of a storage (per process).",
                                       labels=["storage", "kind"]),
            "peak": GaugeMetricFamily("moverd_storage_slot_peak_holders", "Most holders seen at once since start.",
                                      labels=["storage", "kind"]),
        }
        for storage, kind, slots in self.m.slots():
            families["holders"].add_metric([storage, kind], slots.holders)
            families["waiters"].add_metric([storage, kind], slots.waiters)
            families["limit"].add_metric([storage, kind], slots.limit)
            families["peak"].add_metric([storage, kind], slots.peak_holders)
        yield from families.values()
