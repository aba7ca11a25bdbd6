"""The hubble service's settings and components (wired in services/hubble/main.py), per node: the node's
datapath events -> Hubble flows on the bus, ring buffer, metrics, exporter.

Components, in start order:
1. enricher — watch the identities, ipcache and k8s buckets so flows carry namespaces, pods,
   labels, workloads and services (flows flow without it; they are then just less rich).
2. observer — read the pinned `cilium_events` ring buffer of this node (waiting for the
   datapath-writer to create it), keep the last `--hubble-event-buffer-capacity` flows, publish
   each on `propolis.v1.flows.<node>.<VERDICT>.<src ns>.<dst ns>`, count lost events
   (`hubble_lost_events_total`, notices on `propolis.v1.flows.<node>.lost`), answer historic
   queries on `propolis.v1.hubble.query`, feed the metrics on /metrics and the exporter.

Read it with `propolis observe` (through hubble-relay when one runs), or raw with
`propolis bus tail 'propolis.v1.flows.>'`.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from dataclasses import dataclass
from typing import Any

import prometheus_client as prom

from propolis.bus import codec, subjects
from propolis.bus.codec import DecodeError
from propolis.bus.kv import EventType
from propolis.bus.messages import FlowMessage
from propolis.errors import TemporaryError, ValidationError
from propolis.hubble.exporter import FlowExporter, parse_filter_list
from propolis.hubble.flow import ENRICHER_IDENTITIES_KEYS, ENRICHER_K8S_KEYS, Enricher, enrich_proxy_flow, rfc3339
from propolis.hubble.metrics import FlowMetrics, parse_enabled
from propolis.hubble.observer import DEFAULT_CAPACITY, LOST_PERF_RING, FlowSink, Observer
from propolis.maps import events as ev
from propolis.maps.spec import default_pin_dir
from propolis.runtime.component import Component
from propolis.runtime.service import Runtime
from propolis.runtime.settings import CommonSettings, setting

log = logging.getLogger("propolis.hubble")
SERVICE = "hubble"
ALL_METRICS = "{dns,drop,tcp,flow,icmp,http,port-distribution,policy}"


@dataclass
class Settings(CommonSettings):
    bpf_pin_dir: str = setting("", "bpffs directory of this node's maps (empty = /sys/fs/bpf/propolis/<node>)")
    hubble_event_buffer_capacity: int = setting(DEFAULT_CAPACITY, "flows kept for historic queries "
                                                                   "(Cilium's hubble-event-buffer-capacity)")
    hubble_metrics: str = setting(ALL_METRICS, "Cilium's hubble.metrics.enabled, e.g. "
                                               "'{flow:sourceContext=namespace;destinationContext=pod,drop}' "
                                               "(empty = no flow metrics)")
    hubble_export_file_path: str = setting("", "Hubble exporter: JSON-lines file of flows (empty = off)")
    hubble_export_file_max_size_mb: float = setting(10.0, "Hubble exporter: rotate at this size", unit="MiB")
    hubble_export_file_max_backups: int = setting(5, "Hubble exporter: rotated files kept")
    hubble_export_allowlist: str = setting("", "Hubble exporter: JSON list of flow filters to export")
    hubble_export_denylist: str = setting("", "Hubble exporter: JSON list of flow filters not to export")
    hubble_export_fieldmask: str = setting("", "Hubble exporter: comma-separated flow fields to keep (empty = all)")
    lost_poll_interval: float = setting(1.0, "how often the datapath's lost-event counter is read", unit="s")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.hubble_event_buffer_capacity < 1:
            raise ValidationError("hubble_event_buffer_capacity", "must be >= 1")
        if self.hubble_metrics:
            parse_enabled(self.hubble_metrics)
        parse_filter_list(self.hubble_export_allowlist, "hubble_export_allowlist")
        parse_filter_list(self.hubble_export_denylist, "hubble_export_denylist")


class EnricherComponent(Component):
    name, title = "enricher", "watch identities, ipcache and k8s buckets to name flows' endpoints"

    def __init__(self, settings: Settings) -> None:
        super().__init__()
        self.enricher = Enricher(cluster_name=settings.cluster_name)
        self.synced: set[str] = set()

    async def start(self, rt: Runtime) -> None:
        feeds: tuple[tuple[str, str | tuple[str, ...], Any], ...] = (
            (subjects.IDENTITIES_BUCKET, ENRICHER_IDENTITIES_KEYS, self.enricher.identities_event),
            (subjects.IPCACHE_BUCKET, ">", self.enricher.ipcache_event),
            (subjects.K8S_BUCKET, ENRICHER_K8S_KEYS, self.enricher.k8s_event),  # no Pods: a node gets no Pod churn
            (subjects.CLUSTERMESH_CACHE_BUCKET, ">", self.enricher.clustermesh_event),  # remote clusters' peers
            (subjects.WIREGUARD_BUCKET, ">", self.enricher.wireguard_event),  # IP.encrypted: who runs cilium_wg0
            (subjects.FQDN_BUCKET, ">", self.enricher.fqdn_event))  # destination_names: what DNS proxies learned
        self.feeds = len(feeds)
        for bucket, keys, feed in feeds:
            rt.spawn(f"watch-{bucket}", self._watch(rt, bucket, keys, feed), self)
        self.set_degraded("waiting for buckets")

    async def _watch(self, rt: Runtime, bucket: str, keys: str | tuple[str, ...], feed: Any) -> None:
        while True:
            try:
                kv = await rt.bus.kv(bucket)
                break
            except TemporaryError:
                await asyncio.sleep(1.0)
        async for event in kv.watch(keys):
            if event.type is EventType.SYNCED:
                self.synced.add(bucket)
                if len(self.synced) == self.feeds:
                    self.set_ok()
                continue
            feed(event.key, event.value if event.type is EventType.PUT else None)


class ObserverComponent(Component):
    name, title = "observer", "datapath events -> flows: ring buffer, bus, metrics, exporter, queries"

    def __init__(self, settings: Settings, enricher: EnricherComponent) -> None:
        super().__init__()
        self.settings = settings
        self.enricher = enricher
        self.pin_dir = settings.bpf_pin_dir or default_pin_dir(settings.node_name)
        self.reader: ev.EventReader | None = None
        self.exporter: FlowExporter | None = None
        self.observer: Observer | None = None
        self.metrics: FlowMetrics | None = None

    async def start(self, rt: Runtime) -> None:
        s = self.settings
        self.metrics = metrics = FlowMetrics(rt.registry, s.hubble_metrics)
        sinks: list[FlowSink] = [metrics]
        if s.hubble_export_file_path:
            self.exporter = FlowExporter(
                s.hubble_export_file_path, max_size_mb=s.hubble_export_file_max_size_mb,
                max_backups=s.hubble_export_file_max_backups,
                allow=parse_filter_list(s.hubble_export_allowlist, "hubble_export_allowlist"),
                deny=parse_filter_list(s.hubble_export_denylist, "hubble_export_denylist"),
                field_mask=[f.strip() for f in s.hubble_export_fieldmask.split(",") if f.strip()])
            sinks.append(self.exporter)
            rt.spawn("exporter-flush", self._flush_loop(), self)
        self.observer = Observer(s.node_name, instance=rt.instance, enricher=self.enricher.enricher,
                                 capacity=s.hubble_event_buffer_capacity, sinks=sinks, publish=rt.bus.publish_raw)
        self.observer.on_lost.append(metrics.count_lost)
        unpublished = prom.Counter("hubble_flows_publish_failures_total",
                                   "Flows (and lost-event notices) not published on the bus: NATS was away",
                                   registry=rt.registry)
        self.observer.on_publish_failure.append(unpublished.inc)
        if self.exporter is not None:
            exporter = self.exporter
            self.observer.on_lost.append(lambda src, n: exporter.lost(src, n, s.node_name, rfc3339(time.time())))
        await self.observer.serve_queries(rt.bus)
        await rt.bus.subscribe_raw(subjects.accesslog_subject(s.node_name), self._accesslog)
        rt.spawn("events", self._run(rt), self)
        rt.features["Hubble"] = {"state": "Ok", "detail": f"ring {s.hubble_event_buffer_capacity} flows"}
        self.set_degraded(f"waiting for {ev.SPEC.path(self.pin_dir)}")

    async def _accesslog(self, msg: Any) -> None:
        """An L7 flow of this node's proxy (propolis.l7.flows): enriched, then handled like every flow."""
        if self.observer is None:
            return
        try:
            record = codec.decode(msg.data, FlowMessage)
        except DecodeError as exc:
            log.warning("undecodable L7 flow: %s", exc)
            return
        await self.observer.add(enrich_proxy_flow(record.flow, self.enricher.enricher))

    async def _open_reader(self) -> ev.EventReader:
        delay = 0.2
        while True:
            if os.path.exists(ev.SPEC.path(self.pin_dir)) and os.path.exists(ev.LOST_BY_TYPE_SPEC.path(self.pin_dir)):
                try:
                    return ev.EventReader(self.pin_dir)
                except OSError as exc:
                    log.warning("cannot open %s: %s", self.pin_dir, exc)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)

    async def _run(self, rt: Runtime) -> None:
        assert self.observer is not None and self.metrics is not None
        self.reader = await self._open_reader()
        before = self.reader.lost()
        await self.observer.datapath_lost(before)  # baseline: lost-event notices are about losses from now on
        # while the metric mirrors the datapath's counter, losses while no observer read included
        self.metrics.count_lost(LOST_PERF_RING, before)
        self.set_ok()
        rt.spawn("lost-poll", self._lost_loop(rt), self)
        await self.observer.run(self.reader.stream())

    async def _lost_loop(self, rt: Runtime) -> None:
        assert self.observer is not None and self.reader is not None
        while True:
            await asyncio.sleep(self.settings.lost_poll_interval)
            await self.observer.datapath_lost(self.reader.lost())
            self.observer.datapath_lost_by_type = self.reader.lost_by_type()
            rt.progress["lost_events_by_type"] = self.observer.datapath_lost_by_type
            rt.progress["flows_seen"] = self.observer.ring.seen
            rt.progress["lost_events"] = dict(self.observer.lost)

    async def _flush_loop(self) -> None:
        assert self.exporter is not None
        while True:
            await asyncio.sleep(1.0)
            self.exporter.flush()

    async def stop(self) -> None:
        if self.exporter is not None:
            self.exporter.close()
        if self.reader is not None:
            self.reader.close()
