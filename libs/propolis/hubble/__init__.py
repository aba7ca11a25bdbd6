"""Hubble: flows from the datapath's event ring, filters, metrics, relay, exporter and service map.

Flows are plain dicts with Hubble's JSON field names (what `hubble observe -o json` prints), so
people and tools that know Hubble read them unchanged; on the bus they travel as msgpack
(`bus.messages.FlowMessage`).

flow.py         event -> flow, enrichment from the bus (endpoints, identities, ipcache, services)
observer.py     the per-node pipeline: ring buffer, sinks, publish, lost events, historic queries
filters.py      Hubble's FlowFilter semantics; observe_args.py builds them from `hubble observe` flags
metrics.py      Hubble's metrics and the `hubble.metrics.enabled` option syntax
exporter.py     JSON-lines export with rotation and allow/deny lists
client.py       cluster-wide reading over NATS (historic + follow); relay.py serves it over HTTP
servicemap.py   workloads and edges for the relay's page (ui.html)
printer.py      `hubble observe` output formats; bench.py: `propolis bench flows`
"""
