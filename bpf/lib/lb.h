/* SPDX-License-Identifier: Apache-2.0 */
/*
 * lb.h - service load-balancing (kube-proxy replacement), Cilium's layouts.
 *
 * Why maps instead of rule chains: a ClusterIP is one hash lookup whatever
 * the number of services (kube-proxy's iptables walk KUBE-SERVICES rule by
 * rule). Mirrored by libs/propolis/maps/lb.py (checked by test_layouts).
 *
 *   cilium_lb4_services_v2  {VIP, dport, proto, slot} -> slot 0: master entry
 *                           (count of ACTIVE backends, rev_nat_index, flags,
 *                           affinity timeout in backend_id); slot 1..count:
 *                           backend ids. Terminating backends are in no slot.
 *   cilium_lb4_backends_v3  backend id -> {address, port, proto, state}.
 *                           Terminating backends stay here while their
 *                           service lists them, so established flows live on.
 *   cilium_lb4_reverse_nat  rev_nat_index -> the frontend, to restore the
 *                           source of replies.
 *   cilium_lb4_affinity     {client IP, rev_nat_index} -> {last used, backend}
 *                           (sessionAffinity: ClientIP).
 *   cilium_lb4_maglev       rev_nat_index -> Maglev lookup table of M backend
 *                           ids (M prime; loadBalancer.algorithm=maglev).
 *   cilium_snat_v4_external NodePort to a backend on another node: the port
 *                           allocated to each client flow, both directions.
 *
 * Flow memory: a CT_SERVICE entry in the conntrack maps keyed by the ORIGINAL
 * (VIP) tuple holds the chosen backend id in rx_packets (Cilium keeps it in
 * the same place) and its address:port in rx_bytes (checked on every packet),
 * so every packet of a flow sticks to its backend; the
 * translated flow's CT entry carries rev_nat_index for the replies.
 * Policy is decided after DNAT, on the backend's identity (as Cilium).
 */
#ifndef __PROPOLIS_LB_H_
#define __PROPOLIS_LB_H_

#include "lib/common.h"
#include "lib/maps.h"
#include "lib/packet.h"
#include "lib/conntrack.h"

#ifndef LB_SERVICE_MAP_SIZE
#define LB_SERVICE_MAP_SIZE 65536
#endif
#ifndef LB_BACKENDS_MAP_SIZE
#define LB_BACKENDS_MAP_SIZE 65536
#endif
#ifndef LB_REV_NAT_MAP_SIZE
#define LB_REV_NAT_MAP_SIZE 65536
#endif
#ifndef LB_AFFINITY_MAP_SIZE
#define LB_AFFINITY_MAP_SIZE 65536
#endif
#ifndef LB_MAGLEV_MAP_SIZE
#define LB_MAGLEV_MAP_SIZE 16384
#endif
#ifndef LB_MAGLEV_TABLE_SIZE
#define LB_MAGLEV_TABLE_SIZE 16381	/* M, prime: Cilium's maglev.tableSize default (-D from the loader) */
#endif
#ifndef SNAT_MAP_SIZE
#define SNAT_MAP_SIZE 65536
#endif

/* service flags (Cilium's SVC_FLAG_* values) */
#define SVC_FLAG_EXTERNAL_IP	(1 << 0)
#define SVC_FLAG_NODEPORT	(1 << 1)
#define SVC_FLAG_EXT_LOCAL_SCOPE (1 << 2)
#define SVC_FLAG_HOSTPORT	(1 << 3)	/* a pod's hostPort on this node's address */
#define SVC_FLAG_AFFINITY	(1 << 4)
#define SVC_FLAG_LOADBALANCER	(1 << 5)
#define SVC_FLAG_ROUTABLE	(1 << 6)
/* flags2 */
#define SVC_FLAG_INT_LOCAL_SCOPE (1 << 4)
#define SVC_FLAG_MAGLEV		(1 << 7)	/* Propolis: this service selects with Maglev */
/* Propolis, Cluster Mesh: a global service's affinity (for `service list`; not read here) */
#define SVC_FLAG_CLUSTERMESH_AFFINITY_LOCAL	(1 << 5)
#define SVC_FLAG_CLUSTERMESH_AFFINITY_REMOTE	(1 << 6)

/* backend states (Cilium's BE_STATE_*) */
#define BE_STATE_ACTIVE		0
#define BE_STATE_TERMINATING	1
#define BE_STATE_QUARANTINED	2
#define BE_STATE_MAINTENANCE	3

/* Cilium's IPV4_LOOPBACK: the source a pod sees when it reaches itself through a service */
#define LB_HAIRPIN_IP		pp_htonl(0xa9fe2a01)	/* 169.254.42.1 */

/* skb->mark set while a packet crosses the node namespace (kept within a netns,
 * scrubbed when it crosses one, so a pod cannot forge it) */
#define MARK_MAGIC_MASK		0xffff0000
#define MARK_MAGIC_HAIRPIN	0x4c480000	/* "LH": hairpin, already tracked */
#define MARK_MAGIC_NODEPORT	0x4c4e0000	/* "LN": low 16 bits = rev_nat_index */
#define MARK_MAGIC_SNAT_DONE	0x4c530000	/* "LS": forwarded by NodePort (SNAT or reply), not the host's own */

struct lb4_key {
	__be32 address;		/* service VIP */
	__be16 dport;		/* L4 port, network order */
	__u16 backend_slot;	/* 0 = master entry, 1..count = backends */
	__u8 proto;		/* L4 protocol */
	__u8 scope;		/* 0 external, 1 internal (unused: per-node maps hold the node's view) */
	__u8 pad[2];
};

struct lb4_service {
	__u32 backend_id;	/* slot > 0: backend; slot 0: affinity timeout (s) */
	__u16 count;		/* slot 0: number of ACTIVE backends */
	__u16 rev_nat_index;
	__u8 flags;		/* SVC_FLAG_* */
	__u8 flags2;
	__u8 pad[2];
};

struct lb4_backend {
	__be32 address;
	__be16 port;
	__u8 proto;
	__u8 flags;		/* BE_STATE_* */
	__u16 cluster_id;	/* Cluster Mesh: 0 = this cluster, else the remote's id */
	__u8 zone;
	__u8 pad;
};

struct lb4_reverse_nat {
	__be32 address;
	__be16 port;
	__u16 pad;
};

struct lb4_affinity_key {
	__be32 client_ip;
	__u32 client_pad;	/* Cilium: union with the 64-bit socket cookie */
	__u16 rev_nat_id;
	__u8 netns_cookie;
	__u8 pad1;
	__u32 pad2;
};

struct lb_affinity_val {
	__u64 last_used;	/* seconds, bpf_mono_now() */
	__u32 backend_id;
	__u32 pad;
};

struct lb4_maglev {
	__u32 backend_ids[LB_MAGLEV_TABLE_SIZE];
};

/* cilium_snat_v4_external holds both directions of a NodePort flow SNATed to
 * a backend on another node (lib/nodeport.h):
 *   forward {client -> backend, CT_EGRESS} -> {frontend, allocated port}
 *   reverse {backend -> frontend:allocated port, CT_INGRESS} -> {client, its port}
 * The reverse entry is the one that counts: its lifetime (refreshed by both
 * directions) says whether the port is taken, and a forward entry is used only
 * while its reverse entry still maps back to the same client. */
struct ipv4_nat_entry {
	__u32 lifetime;		/* expiry, seconds (bpf_mono_now), as ct_entry.lifetime */
	__u16 flags;		/* CT_F_* of the flow: TCP close tracking */
	__u16 pad;
	__be32 to_addr;		/* reverse: the client to restore; forward: the frontend */
	__be16 to_port;		/* reverse: the client's port; forward: the allocated port */
	__u16 rev_nat_index;
};

BPF_TABLE_PINNED("hash", struct lb4_key, struct lb4_service, lb4_services,
		 LB_SERVICE_MAP_SIZE, PIN_DIR "/cilium_lb4_services_v2", BPF_F_NO_PREALLOC);
BPF_TABLE_PINNED("hash", __u32, struct lb4_backend, lb4_backends,
		 LB_BACKENDS_MAP_SIZE, PIN_DIR "/cilium_lb4_backends_v3", BPF_F_NO_PREALLOC);
BPF_TABLE_PINNED("hash", __u16, struct lb4_reverse_nat, lb4_reverse_nat,
		 LB_REV_NAT_MAP_SIZE, PIN_DIR "/cilium_lb4_reverse_nat", BPF_F_NO_PREALLOC);
BPF_TABLE_PINNED("lru_hash", struct lb4_affinity_key, struct lb_affinity_val, lb4_affinity,
		 LB_AFFINITY_MAP_SIZE, PIN_DIR "/cilium_lb4_affinity");
BPF_TABLE_PINNED("hash", __u32, struct lb4_maglev, lb4_maglev,
		 LB_MAGLEV_MAP_SIZE, PIN_DIR "/cilium_lb4_maglev", BPF_F_NO_PREALLOC);
BPF_TABLE_PINNED("lru_hash", struct ipv4_ct_tuple, struct ipv4_nat_entry, snat4_external,
		 SNAT_MAP_SIZE, PIN_DIR "/cilium_snat_v4_external");

/* ---- packet rewriting ---- */

#define LB_REWRITE_SRC 0
#define LB_REWRITE_DST 1

/* Rewrite the source or destination address+port of a TCP/UDP packet with
 * incremental checksum updates; keeps c->p in step. 0 or -DROP_INVALID. */
static __always_inline int lb4_rewrite(struct __sk_buff *skb, struct pkt4 *p, int which,
				       __be32 new_addr, __be16 new_port)
{
	__u8 vihl;
	__u32 l4_off, csum_off, addr_off, port_off;
	__be32 old_addr = which == LB_REWRITE_DST ? p->daddr : p->saddr;
	__be16 old_port = which == LB_REWRITE_DST ? p->dport : p->sport;
	__u64 l4_flags = BPF_F_PSEUDO_HDR;

	if (bpf_skb_load_bytes(skb, ETH_HLEN, &vihl, 1) < 0)
		return -DROP_INVALID;
	l4_off = ETH_HLEN + ((__u32)(vihl & 0x0f)) * 4;
	if (p->protocol == IPPROTO_TCP) {
		csum_off = l4_off + 16;
	} else {
		csum_off = l4_off + 6;
		l4_flags |= BPF_F_MARK_MANGLED_0;
	}
	addr_off = ETH_HLEN + (which == LB_REWRITE_DST ? 16 : 12);
	port_off = l4_off + (which == LB_REWRITE_DST ? 2 : 0);

	if (old_addr != new_addr) {
		/* a non-first fragment has no L4 header: its first fragment's
		 * checksum update covers the whole datagram */
		if ((!p->no_l4 && bpf_l4_csum_replace(skb, csum_off, old_addr, new_addr, l4_flags | 4) < 0) ||
		    bpf_l3_csum_replace(skb, ETH_HLEN + 10, old_addr, new_addr, 4) < 0 ||
		    bpf_skb_store_bytes(skb, addr_off, &new_addr, 4, 0) < 0)
			return -DROP_INVALID;
	}
	if (old_port != new_port && !p->no_l4) {
		if (bpf_l4_csum_replace(skb, csum_off, old_port, new_port,
					(l4_flags & BPF_F_MARK_MANGLED_0) | 2) < 0 ||
		    bpf_skb_store_bytes(skb, port_off, &new_port, 2, 0) < 0)
			return -DROP_INVALID;
	}
	if (which == LB_REWRITE_DST) {
		p->daddr = new_addr;
		p->dport = new_port;
		p->policy_port = pp_ntohs(new_port);
	} else {
		p->saddr = new_addr;
		p->sport = new_port;
	}
	return 0;
}

/* Restore the frontend as the source of a reply (reverse NAT). */
static __always_inline int lb4_rev_nat(struct __sk_buff *skb, struct pkt4 *p, __u16 rev_nat_index)
{
	struct lb4_reverse_nat *rn = lb4_reverse_nat.lookup(&rev_nat_index);

	if (!rn)
		return 0;	/* service gone: the reply keeps the backend's address */
	return lb4_rewrite(skb, p, LB_REWRITE_SRC, rn->address, rn->port);
}

/*
 * RFC 5508: an ICMP error about a translated flow, translated back. The quoted
 * packet names the backend; the client's socket knows only the frontend, so
 * without this a UDP client of a Service port nobody listens on never gets
 * ECONNREFUSED and a fragmentation-needed for a ClusterIP flow never reaches
 * the client's socket (a path-MTU black hole).
 *   side CT_INGRESS (cil_to_container): the local pod is the client that sent
 *     the quoted packet to the backend (its CT_EGRESS entry has rev_nat_index);
 *   side CT_EGRESS (cil_from_container): the local pod is a NodePort backend
 *     erring about a packet it received (its CT_INGRESS entry has rev_nat_index).
 * The quoted destination becomes the frontend again (the inner IP checksum is
 * updated; the ICMP checksum covers that header, whose sum does not change,
 * and the port); the outer source too when the backend itself sent the error
 * (an error from a router in between keeps the router's address). The quoted
 * L4 checksum is left alone: receivers do not check a truncated segment.
 * 1 = translated, 0 = not about a translated flow, -DROP_INVALID on failure.
 */
static __always_inline int lb4_icmp_err_rev_nat(struct __sk_buff *skb, struct pkt4 *p, __u8 side)
{
	struct ipv4_ct_tuple tuple = {};
	struct lb4_reverse_nat *rn;
	struct ct_entry *e;
	__u32 icmp_off, inner_off, inner_l4;
	__u16 rev_nat;
	__u8 vihl;

	if (!p->has_inner || (p->inner_protocol != IPPROTO_TCP && p->inner_protocol != IPPROTO_UDP))
		return 0;
	if (side == CT_INGRESS ? p->inner_saddr != p->daddr : p->inner_daddr != p->saddr)
		return 0;
	tuple.daddr = p->inner_daddr;
	tuple.saddr = p->inner_saddr;
	tuple.dport = p->inner_dport;
	tuple.sport = p->inner_sport;
	tuple.nexthdr = p->inner_protocol;
	tuple.flags = side == CT_INGRESS ? CT_EGRESS : CT_INGRESS;
	e = ct_map_lookup(p->inner_protocol == IPPROTO_TCP, &tuple);
	if (!e || !e->rev_nat_index)
		return 0;
	rev_nat = e->rev_nat_index;
	rn = lb4_reverse_nat.lookup(&rev_nat);
	if (!rn)
		return 0;

	if (bpf_skb_load_bytes(skb, ETH_HLEN, &vihl, 1) < 0)
		return -DROP_INVALID;
	icmp_off = ETH_HLEN + ((__u32)(vihl & 0x0f)) * 4;
	inner_off = icmp_off + 8;
	if (bpf_skb_load_bytes(skb, inner_off, &vihl, 1) < 0)
		return -DROP_INVALID;
	inner_l4 = inner_off + ((__u32)(vihl & 0x0f)) * 4;

	if (p->saddr == p->inner_daddr && p->saddr != rn->address) {
		if (bpf_l3_csum_replace(skb, ETH_HLEN + 10, p->saddr, rn->address, 4) < 0 ||
		    bpf_skb_store_bytes(skb, ETH_HLEN + 12, &rn->address, 4, 0) < 0)
			return -DROP_INVALID;
		p->saddr = rn->address;
	}
	if (p->inner_daddr != rn->address) {
		if (bpf_l3_csum_replace(skb, inner_off + 10, p->inner_daddr, rn->address, 4) < 0 ||
		    bpf_skb_store_bytes(skb, inner_off + 16, &rn->address, 4, 0) < 0)
			return -DROP_INVALID;
		p->inner_daddr = rn->address;
	}
	if (p->inner_dport != rn->port) {
		if (bpf_l4_csum_replace(skb, icmp_off + 2, p->inner_dport, rn->port, 2) < 0 ||
		    bpf_skb_store_bytes(skb, inner_l4 + 2, &rn->port, 2, 0) < 0)
			return -DROP_INVALID;
		p->inner_dport = rn->port;
	}
	return 1;
}

/* ---- backend selection ---- */

static __always_inline __u32 lb_mix(__u32 h)
{
	h ^= h >> 16;
	h *= 0x85ebca6b;
	h ^= h >> 13;
	h *= 0xc2b2ae35;
	h ^= h >> 16;
	return h;
}

static __always_inline __u32 lb4_flow_hash(struct pkt4 *p)
{
	__u32 h = lb_mix(p->saddr ^ 0x9e3779b9);

	h = lb_mix(h ^ p->daddr);
	h = lb_mix(h ^ (((__u32)p->sport << 16) | p->dport));
	return lb_mix(h ^ p->protocol);
}

/* A backend id among the service's ACTIVE slots: the Maglev table's entry for
 * `hash`, else slot hash % count + 1. The per-packet path hashes the flow for
 * Maglev and draws a random number otherwise; the socket path (bpf_sock.c)
 * passes its own (lib/sock.h), so both choose from the same maps the same way. */
static __always_inline __u32 lb4_select_backend_id(struct lb4_key *key, struct lb4_service *svc, __u32 hash)
{
	struct lb4_service *slot;
	struct lb4_maglev *table;
	__u32 rev = svc->rev_nat_index, idx;

	if (svc->flags2 & SVC_FLAG_MAGLEV) {
		table = lb4_maglev.lookup(&rev);
		if (!table)
			return 0;
		idx = hash % LB_MAGLEV_TABLE_SIZE;
		asm volatile("" : "+r"(idx));	/* keep the bound check for the verifier */
		if (idx >= LB_MAGLEV_TABLE_SIZE)
			return 0;
		return table->backend_ids[idx];
	}
	key->backend_slot = (__u16)(hash % svc->count) + 1;
	slot = lb4_services.lookup(key);
	key->backend_slot = 0;
	return slot ? slot->backend_id : 0;
}

static __always_inline __u32 lb4_select_new(struct pkt4 *p, struct lb4_key *key,
					    struct lb4_service *svc)
{
	return lb4_select_backend_id(key, svc, svc->flags2 & SVC_FLAG_MAGLEV ? lb4_flow_hash(p)
									      : bpf_get_prandom_u32());
}

/* sessionAffinity: ClientIP. The per-packet path keys on the client's address;
 * the socket path on the client's network namespace (Cilium's netns cookie). */
static __always_inline void lb4_affinity_key_of(struct lb4_affinity_key *akey, struct pkt4 *p,
						struct lb4_service *svc)
{
	akey->client_ip = p->saddr;
	akey->rev_nat_id = svc->rev_nat_index;
}

static __always_inline __u32 lb4_affinity_backend_by(struct lb4_affinity_key *akey, struct lb4_service *svc,
						     __u32 now)
{
	struct lb_affinity_val *aval;
	struct lb4_backend *be;
	__u32 id;

	aval = lb4_affinity.lookup(akey);
	if (!aval || aval->last_used + svc->backend_id < now)
		return 0;
	id = aval->backend_id;
	be = lb4_backends.lookup(&id);
	if (!be || be->flags != BE_STATE_ACTIVE)
		return 0;
	return id;
}

static __always_inline void lb4_affinity_update_by(struct lb4_affinity_key *akey, __u32 id, __u32 now)
{
	struct lb_affinity_val aval = {};

	aval.last_used = now;
	aval.backend_id = id;
	lb4_affinity.update(akey, &aval);
}

static __always_inline __u32 lb4_affinity_backend(struct pkt4 *p, struct lb4_service *svc, __u32 now)
{
	struct lb4_affinity_key akey = {};

	lb4_affinity_key_of(&akey, p, svc);
	return lb4_affinity_backend_by(&akey, svc, now);
}

static __always_inline void lb4_affinity_update(struct pkt4 *p, struct lb4_service *svc, __u32 id, __u32 now)
{
	struct lb4_affinity_key akey = {};

	lb4_affinity_key_of(&akey, p, svc);
	lb4_affinity_update_by(&akey, id, now);
}

/* What a CT_SERVICE entry remembers of its backend besides the id (in
 * rx_bytes): address and port. Backend ids are renumbered when the writer
 * restarts, so an id alone could send an old flow to another Service's backend. */
static __always_inline __u64 lb4_backend_tag(struct lb4_backend *be)
{
	return ((__u64)be->port << 32) | be->address;
}

/* A new CT_SERVICE entry not written yet: a pod's service flow is remembered
 * only once its policy allowed it (lb4_commit_flow), so a flood of denied
 * connections to a Service takes no conntrack room from established flows. */
struct lb4_flow {
	struct ipv4_ct_tuple tuple;
	struct ct_entry entry;
	__u8 pending;
};

static __always_inline void lb4_commit_flow(struct lb4_flow *flow)
{
	if (flow->pending) {
		ct_map_update(flow->tuple.nexthdr == IPPROTO_TCP, &flow->tuple, &flow->entry);
		flow->pending = 0;
	}
}

/* The backend of this flow: the one its CT_SERVICE entry remembers (even a
 * terminating one) if that id still names the same address and port, else a
 * new choice among the ACTIVE backends (affinity, Maglev or random),
 * remembered in a new CT_SERVICE entry: written now, or left in *later for
 * lb4_commit_flow when the caller decides policy first. 0 = none. */
static __always_inline __u32 lb4_backend_of_flow(struct pkt4 *p, struct lb4_key *key,
						 struct lb4_service *svc, struct lb4_backend **backend,
						 struct lb4_flow *later)
{
	struct ipv4_ct_tuple tuple = {};
	struct ct_entry entry = {}, *e;
	__u8 is_tcp = p->protocol == IPPROTO_TCP;
	__u32 now = bpf_mono_now();
	__u32 id = 0;

	ct_tuple_of(p, CT_SERVICE, &tuple);
	e = ct_map_lookup(is_tcp, &tuple);
	if (e && e->lifetime >= now && e->rev_nat_index == svc->rev_nat_index &&
	    !(is_tcp && (p->tcp_flags & TCP_FLAG_SYN) && !(p->tcp_flags & TCP_FLAG_ACK) &&
	      (e->flags & (CT_F_TX_CLOSING | CT_F_RX_CLOSING)))) {
		id = (__u32)e->rx_packets;
		*backend = lb4_backends.lookup(&id);
		if (*backend && e->rx_bytes == lb4_backend_tag(*backend)) {
			if (svc->flags & SVC_FLAG_AFFINITY)
				lb4_affinity_update(p, svc, id, now);
			ct_update_entry(e, p, 0, now);
			return id;
		}
		/* the backend was removed, or its id now names another: choose again */
		id = 0;
		*backend = 0;
	}
	if (svc->count == 0)
		return 0;
	if (svc->flags & SVC_FLAG_AFFINITY)
		id = lb4_affinity_backend(p, svc, now);
	if (!id)
		id = lb4_select_new(p, key, svc);
	if (!id)
		return 0;
	*backend = lb4_backends.lookup(&id);
	if (!*backend)
		return 0;
	if (svc->flags & SVC_FLAG_AFFINITY)
		lb4_affinity_update(p, svc, id, now);

	entry.rx_packets = id;		/* Cilium: backend_id shares this slot */
	entry.rx_bytes = lb4_backend_tag(*backend);
	entry.rev_nat_index = svc->rev_nat_index;
	entry.tx_packets = 1;
	entry.tx_bytes = p->len;
	entry.tx_flags_seen = p->tcp_flags;
	if (!is_tcp)
		entry.lifetime = now + CT_CONNECTION_LIFETIME_NONTCP;
	else
		entry.lifetime = ct_tcp_lifetime(&entry.flags, p->tcp_flags, 0, now);
	if (later) {
		later->tuple = tuple;
		later->entry = entry;
		later->pending = 1;
	} else {
		ct_map_update(is_tcp, &tuple, &entry);
	}
	return id;
}

/* A NodePort flow the local backend's policy denied: forget the backend its
 * CT_SERVICE entry (client -> frontend) remembers, so denied connections do
 * not hold conntrack room. */
static __always_inline void lb4_forget_flow(struct pkt4 *p, __u16 rev_nat_index)
{
	struct ipv4_ct_tuple tuple = {};
	struct lb4_reverse_nat *rn = lb4_reverse_nat.lookup(&rev_nat_index);

	if (!rn)
		return;
	tuple.saddr = p->saddr;
	tuple.daddr = rn->address;
	tuple.sport = p->sport;
	tuple.dport = rn->port;
	tuple.nexthdr = p->protocol;
	tuple.flags = CT_SERVICE;
	if (p->protocol == IPPROTO_TCP)
		ct4_global.delete(&tuple);
	else
		ct_any4_global.delete(&tuple);
}

/* The service this packet is addressed to, or NULL. */
static __always_inline struct lb4_service *lb4_lookup_service(struct pkt4 *p, struct lb4_key *key)
{
	if (p->protocol != IPPROTO_TCP && p->protocol != IPPROTO_UDP)
		return 0;
	key->address = p->daddr;
	key->dport = p->dport;
	key->backend_slot = 0;
	key->proto = p->protocol;
	key->scope = 0;
	return lb4_services.lookup(key);
}

/*
 * cil_from_container: DNAT a packet addressed to a service frontend.
 * Returns 0 (not a service or translated; *rev_nat set when translated,
 * *hairpin when the pod reached itself; a new flow's CT_SERVICE entry waits
 * in *later for lb4_commit_flow) or -DROP_NO_SERVICE.
 */
static __always_inline int lb4_local(struct __sk_buff *skb, struct pkt4 *p, __u16 *rev_nat, int *hairpin,
				     struct lb4_flow *later)
{
	struct lb4_key key = {};
	struct lb4_service *svc;
	struct lb4_backend *be = 0;
	__be32 client;
	int ret;

	svc = lb4_lookup_service(p, &key);
	if (!svc)
		return 0;
	if (!lb4_backend_of_flow(p, &key, svc, &be, later) || !be)
		return -DROP_NO_SERVICE;
	client = p->saddr;
	ret = lb4_rewrite(skb, p, LB_REWRITE_DST, be->address, be->port);
	if (ret < 0)
		return ret;
	*rev_nat = svc->rev_nat_index;
	if (be->address == client) {
		/* hairpin: the pod would drop its own address as a source */
		ret = lb4_rewrite(skb, p, LB_REWRITE_SRC, LB_HAIRPIN_IP, p->sport);
		if (ret < 0)
			return ret;
		skb->mark = MARK_MAGIC_HAIRPIN;
		*hairpin = 1;
	}
	return 0;
}

/*
 * cil_from_container: a reply of the pod to LB_HAIRPIN_IP belongs to a flow
 * that reached itself through a service: undo both translations (source =
 * the frontend, destination = the pod). 1 handled, 0 not a hairpin reply.
 */
static __always_inline int lb4_hairpin_reply(struct __sk_buff *skb, struct pkt4 *p)
{
	struct ipv4_ct_tuple tuple = {};
	struct ct_entry *e;
	__be32 pod = p->saddr;
	__u8 is_tcp = p->protocol == IPPROTO_TCP;
	__u32 now = bpf_mono_now();

	if (p->daddr != LB_HAIRPIN_IP)
		return 0;
	ct_reverse_tuple_of(p, CT_EGRESS, &tuple);
	e = ct_map_lookup(is_tcp, &tuple);
	if (!e || e->lifetime < now || !e->rev_nat_index)
		return 0;
	ct_update_entry(e, p, 1, now);
	if (lb4_rev_nat(skb, p, e->rev_nat_index) < 0)
		return 0;
	if (lb4_rewrite(skb, p, LB_REWRITE_DST, pod, p->dport) < 0)
		return 0;
	skb->mark = MARK_MAGIC_HAIRPIN;
	return 1;
}

#endif /* __PROPOLIS_LB_H_ */
