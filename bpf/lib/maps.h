/* SPDX-License-Identifier: Apache-2.0 */
/*
 * maps.h - EVERY map of the Propolis datapath: key/value layouts and the
 * map definitions, in one place.
 *
 * Why one header: the Python mirror (libs/propolis/maps/, one module per map)
 * is checked against bcc's view of these structs by tests/bpf/test_layouts.py,
 * so C and Python cannot drift. Change a struct here -> change its module.
 *
 * All maps are pinned under PIN_DIR (per node, default
 * /sys/fs/bpf/propolis/<node>/) with Cilium's pin names, so they outlive
 * the datapath-writer process; bcc adopts a pinned map when the path exists.
 * The in-kernel object name (the C name below) is limited to 15 characters,
 * which is why some C names are shorter than their pin names.
 *
 * Sizes are overridable with -D by the loader; the Python modules own the
 * defaults and say why they were chosen.
 */
#ifndef __PROPOLIS_MAPS_H_
#define __PROPOLIS_MAPS_H_

#include "lib/common.h"

/* An address as it sits in map keys: IPv4 in the first 4 bytes (network
 * order), the whole 16 bytes for IPv6 later. Keys also carry a family. */
union l3addr {
	__be32 ip4;
	__u8 ip6[16];
};

/* ------------------------------------------------------------------ */
/* cilium_lxc: local endpoint IP -> endpoint (HASH)                    */
/* ------------------------------------------------------------------ */
#ifndef ENDPOINTS_MAP_SIZE
#define ENDPOINTS_MAP_SIZE 65535
#endif

struct endpoint_key {
	union l3addr addr;
	__u8 family;		/* ENDPOINT_KEY_IPV4 / _IPV6 */
	__u8 key;		/* unused (Cilium: encryption key index) */
	__u16 cluster_id;	/* unused, room for Cluster Mesh */
};

struct endpoint_info {
	__u32 ifindex;		/* host-side veth (lxc...) in the node namespace */
	__u16 unused;
	__u16 lxc_id;		/* endpoint id */
	__u32 flags;		/* ENDPOINT_F_* (enforcement per direction) */
	__u32 sec_id;		/* security identity of the endpoint */
	__u8 mac[8];		/* room for L2 rewrite later */
	__u8 node_mac[8];
};

BPF_TABLE_PINNED("hash", struct endpoint_key, struct endpoint_info,
		 cilium_lxc, ENDPOINTS_MAP_SIZE, PIN_DIR "/cilium_lxc", BPF_F_NO_PREALLOC);

/* ------------------------------------------------------------------ */
/* cilium_ipcache: IP/prefix -> identity (LPM_TRIE)                    */
/* ------------------------------------------------------------------ */
#ifndef IPCACHE_MAP_SIZE
#define IPCACHE_MAP_SIZE 512000
#endif

/* prefixlen counts the bits after it: 32 (cluster_id, pad1, family) + IP prefix */
#define IPCACHE_PREFIX_STATIC 32

struct ipcache_key {
	__u32 prefixlen;
	__u16 cluster_id;
	__u8 pad1;
	__u8 family;
	union l3addr addr;
};

#define IPCACHE_F_SKIP_TUNNEL	(1 << 0)
#define IPCACHE_F_HAS_TUNNEL_EP	(1 << 1)

struct remote_endpoint_info {
	__u32 sec_identity;
	union l3addr tunnel_endpoint;	/* node of the IP (later: encapsulation/routing) */
	__u16 pad;
	__u8 key;			/* encryption key index (later) */
	__u8 flags;			/* IPCACHE_F_* */
};

BPF_TABLE_PINNED("lpm_trie", struct ipcache_key, struct remote_endpoint_info,
		 cilium_ipcache, IPCACHE_MAP_SIZE, PIN_DIR "/cilium_ipcache", BPF_F_NO_PREALLOC);

/* ------------------------------------------------------------------ */
/* Policy: cilium_ep_to_policy (HASH_OF_MAPS, endpoint id -> inner     */
/* LPM_TRIE pinned as cilium_policy_v2_<EPID 5 digits>)                */
/* ------------------------------------------------------------------ */
#ifndef POLICY_MAP_SIZE
#define POLICY_MAP_SIZE 16384
#endif
#ifndef POLICY_OUTER_MAP_SIZE
#define POLICY_OUTER_MAP_SIZE 65535
#endif

/* Bits of policy_key covered by prefixlen: sec_label(32) + egress(8) are
 * always matched exactly, then protocol(8), then dport(16) bit-prefixes
 * (a port range is a few prefix-aligned blocks). */
#define POLICY_PREFIX_STATIC	40
#define POLICY_PREFIX_PROTO	8
#define POLICY_PREFIX_DPORT	16
#define POLICY_PREFIX_FULL	(POLICY_PREFIX_STATIC + POLICY_PREFIX_PROTO + POLICY_PREFIX_DPORT)

struct policy_key {
	__u32 prefixlen;
	__u32 sec_label;	/* peer identity; 0 = any */
	__u8 egress;		/* POLICY_INGRESS / POLICY_EGRESS */
	__u8 protocol;		/* 0 = any (prefix stops before it) */
	__be16 dport;		/* network order; ICMP: the ICMP type */
};

#define POLICY_F_DENY		(1 << 0)
#define POLICY_F_WILDCARD_PROTO	(1 << 1)
#define POLICY_F_WILDCARD_DPORT	(1 << 2)

struct policy_entry {
	__be16 proxy_port;	/* 0 = no L7 redirect (later: redirect to this proxy port) */
	__u8 flags;		/* POLICY_F_* */
	__u8 auth_type;		/* unused (Cilium: mutual auth) */
	__u8 prefix_len;	/* proto+port bits this entry matches (0..24): more specific wins */
	__u8 pad1;
	__u16 pad2;
	__u64 packets;		/* new connections decided by this entry */
	__u64 bytes;
};

/* Template of the inner maps; the datapath writer creates one per endpoint
 * with exactly these attributes (the kernel insists). */
BPF_F_TABLE("lpm_trie", struct policy_key, struct policy_entry,
	    policy_tmpl, POLICY_MAP_SIZE, BPF_F_NO_PREALLOC);

BPF_TABLE_PINNED("hash_of_maps$policy_tmpl", __u32, int,
		 ep_to_policy, POLICY_OUTER_MAP_SIZE, PIN_DIR "/cilium_ep_to_policy");

/* ------------------------------------------------------------------ */
/* Conntrack: cilium_ct4_global (TCP) / cilium_ct_any4_global (LRU)    */
/* ------------------------------------------------------------------ */
#ifndef CT_MAP_SIZE_TCP
#define CT_MAP_SIZE_TCP 65536
#endif
#ifndef CT_MAP_SIZE_ANY
#define CT_MAP_SIZE_ANY 32768
#endif

/* Tuple of the ORIGINAL direction of a connection as the packet that
 * created it carried it (saddr = its source); flags = CT_EGRESS when the
 * entry was created by the pod sending (cil_from_container), CT_INGRESS
 * when created by a packet entering the pod (cil_to_container). */
#define CT_EGRESS	0
#define CT_INGRESS	1
#define CT_SERVICE	4	/* service entries: VIP tuple -> backend (lib/lb.h) */

struct ipv4_ct_tuple {
	__be32 daddr;
	__be32 saddr;
	__be16 dport;
	__be16 sport;
	__u8 nexthdr;
	__u8 flags;
	__u16 pad;
};

#define CT_F_TX_CLOSING		(1 << 0)
#define CT_F_RX_CLOSING		(1 << 1)
#define CT_F_SEEN_NON_SYN	(1 << 2)

struct ct_entry {
	__u64 rx_packets;	/* reply direction (CT_SERVICE entries: the backend id) */
	__u64 rx_bytes;		/* (CT_SERVICE entries: backend address | port << 32) */
	__u64 tx_packets;	/* original direction */
	__u64 tx_bytes;
	__u32 lifetime;		/* expiry, seconds since boot (bpf_ktime_get_ns) */
	__u16 flags;		/* CT_F_* */
	__u16 rev_nat_index;	/* service frontend to restore on replies (lib/lb.h) */
	__u16 ifindex;		/* lxc interface of the endpoint */
	__u8 tx_flags_seen;	/* TCP flags seen, original direction */
	__u8 rx_flags_seen;	/* TCP flags seen, reply direction */
	__u32 src_sec_id;	/* identity of the original source */
	__u32 last_tx_report;	/* unused yet (Cilium: monitor aggregation) */
	__u32 last_rx_report;
	__be16 proxy_port;	/* later: L7 redirect of this flow */
	__u16 endpoint_id;	/* the local endpoint that owns the entry */
	__u32 dst_sec_id;	/* identity of the original destination */
};

BPF_TABLE_PINNED("lru_hash", struct ipv4_ct_tuple, struct ct_entry,
		 ct4_global, CT_MAP_SIZE_TCP, PIN_DIR "/cilium_ct4_global");
BPF_TABLE_PINNED("lru_hash", struct ipv4_ct_tuple, struct ct_entry,
		 ct_any4_global, CT_MAP_SIZE_ANY, PIN_DIR "/cilium_ct_any4_global");

/* ------------------------------------------------------------------ */
/* cilium_ipv4_frag_datagrams: fragment id -> the datagram's L4 ports  */
/* (LRU_HASH), so non-first fragments meet conntrack and policy too    */
/* ------------------------------------------------------------------ */
#ifndef FRAG_MAP_SIZE
#define FRAG_MAP_SIZE 8192
#endif
struct ipv4_frag_id {
	__be32 daddr;
	__be32 saddr;
	__be16 id;		/* IP identification of the datagram */
	__u8 proto;
	__u8 pad;
};
struct ipv4_frag_l4ports {
	__be16 sport;
	__be16 dport;
	__u16 policy_port;	/* Propolis: pkt4.policy_port of the first fragment (ICMP types) */
	__u16 pad;
};
BPF_TABLE_PINNED("lru_hash", struct ipv4_frag_id, struct ipv4_frag_l4ports,
		 frag4_datagrams, FRAG_MAP_SIZE, PIN_DIR "/cilium_ipv4_frag_datagrams");
/* ------------------------------------------------------------------ */
/* cilium_metrics: (reason, direction) -> packets, bytes (PERCPU_HASH) */
/* ------------------------------------------------------------------ */
#ifndef METRICS_MAP_SIZE
#define METRICS_MAP_SIZE 1024
#endif

struct metrics_key {
	__u8 reason;		/* 0 = forwarded, >= 130 = drop reason (drop.h) */
	__u8 dir;		/* METRIC_DIR_* */
	__u16 line;		/* unused (0): rows aggregate per reason */
	__u8 file;
	__u8 reserved[3];
};

struct metrics_value {
	__u64 count;
	__u64 bytes;
};

BPF_TABLE_PINNED("percpu_hash", struct metrics_key, struct metrics_value,
		 cilium_metrics, METRICS_MAP_SIZE, PIN_DIR "/cilium_metrics");

/* ------------------------------------------------------------------ */
/* cilium_runtime_config: per-node settings read per packet (ARRAY[1]) */
/* ------------------------------------------------------------------ */
#define MONITOR_AGGREGATION_NONE	0	/* trace every forwarded packet */
#define MONITOR_AGGREGATION_LOW		1
#define MONITOR_AGGREGATION_MEDIUM	2	/* new flows + first SYN/FIN/RST per direction */
#define MONITOR_AGGREGATION_MAXIMUM	3	/* new flows only */

#define EVENTS_DISABLE_DROP		(1 << 0)
#define EVENTS_DISABLE_POLICY_VERDICT	(1 << 1)
#define EVENTS_DISABLE_TRACE		(1 << 2)

struct runtime_config {
	__u32 monitor_aggregation;	/* MONITOR_AGGREGATION_* */
	__u32 events_disabled;		/* EVENTS_DISABLE_* */
	__u32 events_rate_limit;	/* events per second per endpoint, 0 = no limit (bpf.events.default.rateLimit) */
	__u32 events_burst_limit;	/* bucket size, 0 = the rate (bpf.events.default.burstLimit) */
	/* encryption.strictMode: cross-node pod traffic leaving the node's underlay
	 * device unencrypted (both ends in this CIDR) is dropped (bpf_host.c) */
	__be32 strict_ipv4_net;		/* encryption.strictMode.cidr, network */
	__be32 strict_ipv4_mask;	/* its netmask; 0 = strict mode off */
	__u32 encrypt_flags;		/* ENCRYPT_F_* */
	__u32 reserved;
};

#define ENCRYPT_F_STRICT_ALLOW_REMOTE_NODE	(1 << 0)	/* encryption.strictMode.allowRemoteNodeIdentities */

BPF_TABLE_PINNED("array", __u32, struct runtime_config,
		 runtime_config, 1, PIN_DIR "/cilium_runtime_config");

/* ------------------------------------------------------------------ */
/* cilium_events: ring buffer of flow_event; cilium_events_lost_by_type */
/* counts what did not make it in; cilium_events_ratelimit: buckets    */
/* ------------------------------------------------------------------ */
#ifndef EVENTS_RINGBUF_PAGES
#define EVENTS_RINGBUF_PAGES 1024	/* 4 MiB with 4 KiB pages, power of two */
#endif

/* message types (Cilium pkg/monitor/api) */
#define CILIUM_NOTIFY_DROP		1
#define CILIUM_NOTIFY_TRACE		4
#define CILIUM_NOTIFY_POLICY_VERDICT	5

/* trace observation points (Cilium TRACE_*) carried in subtype */
#define TRACE_TO_LXC	0
#define TRACE_TO_PROXY	1
#define TRACE_TO_HOST	2
#define TRACE_TO_STACK	3
#define TRACE_FROM_LXC	5

/* verdicts (Hubble's Verdict enum numbers) */
#define VERDICT_FORWARDED	1
#define VERDICT_DROPPED		2
#define VERDICT_AUDIT		4
#define VERDICT_REDIRECTED	5

/* trace reasons (Hubble's TraceReason enum numbers) */
#define TRACE_REASON_UNKNOWN		0
#define TRACE_REASON_NEW		1
#define TRACE_REASON_ESTABLISHED	2
#define TRACE_REASON_REPLY		3
#define TRACE_REASON_RELATED		4
#define TRACE_REASON_REOPENED		5

/* policy match types (Cilium monitor api POLICY_MATCH_*) */
#define POLICY_MATCH_NONE	0
#define POLICY_MATCH_L3_ONLY	1
#define POLICY_MATCH_L3_L4	2
#define POLICY_MATCH_L4_ONLY	3
#define POLICY_MATCH_ALL	4
#define POLICY_MATCH_L3_PROTO	5
#define POLICY_MATCH_PROTO_ONLY	6

#define FLOW_EVENT_F_IS_REPLY		(1 << 0)
#define FLOW_EVENT_F_ENFORCED		(1 << 1)	/* policy was enforced for this direction */

struct flow_event {
	__u8 type;		/* CILIUM_NOTIFY_* */
	__u8 subtype;		/* drop: reason; trace: observation point; verdict: 0 */
	__u16 source;		/* endpoint id */
	__u32 ifindex;		/* lxc interface */
	__u64 timestamp_ns;	/* bpf_ktime_get_ns(): since boot */
	__u32 len_orig;		/* packet length */
	__u32 src_identity;
	__u32 dst_identity;
	__u8 family;		/* ENDPOINT_KEY_IPV4 */
	__u8 protocol;		/* IP protocol */
	__u8 direction;		/* METRIC_DIR_INGRESS / _EGRESS */
	__u8 tcp_flags;		/* FIN 0x01 SYN 0x02 RST 0x04 PSH 0x08 ACK 0x10 URG 0x20 ECE 0x40 CWR 0x80 */
	union l3addr saddr;
	union l3addr daddr;
	__be16 sport;
	__be16 dport;
	__u8 verdict;		/* VERDICT_* */
	__u8 match_type;	/* POLICY_MATCH_* (policy verdicts) */
	__u8 trace_reason;	/* TRACE_REASON_* */
	__u8 flags;		/* FLOW_EVENT_F_* */
	__be16 proxy_port;
	__u16 drop_reason;	/* same as subtype for drops, 0 otherwise */
	__u8 icmp_type;
	__u8 icmp_code;
	__u16 pad;
};

struct cilium_events_table_t {
	int key;
	u32 leaf;
	int (*ringbuf_output) (void *, u64, u64);
	void *(*ringbuf_reserve) (u64);
	void (*ringbuf_discard) (void *, u64);
	void (*ringbuf_submit) (void *, u64);
	u32 max_entries;
};
/* bcc's BPF_RINGBUF_OUTPUT cannot pin; this is the same table, pinned */
__attribute__((section("maps/ringbuf:" PIN_DIR "/cilium_events")))
struct cilium_events_table_t cilium_events = { .max_entries = EVENTS_RINGBUF_PAGES * PAGE_SIZE };

/* Events that did not make it into the ring, per type and cause: a loss must
 * be attributable (which kind of event; ring full, or the endpoint over its
 * rate). Index = type. Hubble's lost events = ring_full summed. */
#define EVENTS_LOST_TYPES	8
struct events_lost_count {
	__u64 ring_full;	/* no room in cilium_events */
	__u64 rate_limited;	/* the endpoint was over its events rate */
};
BPF_TABLE_PINNED("percpu_array", __u32, struct events_lost_count,
		 events_lost_typ, EVENTS_LOST_TYPES, PIN_DIR "/cilium_events_lost_by_type");
/* Per-endpoint token bucket of events (key: endpoint id, 0 = the netdev), so
 * one flooded pod cannot fill the ring every other pod's events share.
 * credit is in 1e-9 tokens: rate * elapsed ns adds up without rounding away. */
#ifndef EVENTS_RATELIMIT_MAP_SIZE
#define EVENTS_RATELIMIT_MAP_SIZE 65535
#endif
struct events_rate_bucket {
	__u64 last_ns;
	__u64 credit;
};
BPF_TABLE_PINNED("hash", __u32, struct events_rate_bucket,
		 events_ratelim, EVENTS_RATELIMIT_MAP_SIZE, PIN_DIR "/cilium_events_ratelimit", BPF_F_NO_PREALLOC);

/* ------------------------------------------------------------------ */
/* Later work keeps its layouts in lib/lb.h (issue 6: services,        */
/* backends, reverse NAT) and here: cilium_throttle (bandwidth).       */
/* ------------------------------------------------------------------ */

#endif /* __PROPOLIS_MAPS_H_ */
