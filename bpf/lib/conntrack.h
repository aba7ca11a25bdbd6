/* SPDX-License-Identifier: Apache-2.0 */
/*
 * conntrack.h - connection tracking in cilium_ct4_global (TCP) and
 * cilium_ct_any4_global (everything else), both LRU hashes.
 *
 * Why: a policy decision is taken once per connection. An allowed NEW
 * packet creates an entry; later packets of the same connection
 * (ESTABLISHED) and packets in the other direction (REPLY) pass without a
 * second policy lookup, so a deny rule added later stops new connections
 * while established ones live on.
 *
 * Keys hold the ORIGINAL tuple plus the side that created it (CT_EGRESS
 * from cil_from_container, CT_INGRESS from cil_to_container), so two pods
 * on the same node each keep their own entry for one connection.
 * Lifetimes (seconds, Cilium's defaults): TCP established 8000, SYN 60,
 * closing (FIN/RST seen) 10, non-TCP 60. Expired entries count as absent;
 * LRU eviction and the agent's GC remove them.
 */
#ifndef __PROPOLIS_CONNTRACK_H_
#define __PROPOLIS_CONNTRACK_H_

#include "lib/maps.h"
#include "lib/packet.h"

#ifndef CT_CONNECTION_LIFETIME_TCP
#define CT_CONNECTION_LIFETIME_TCP	8000
#endif
#ifndef CT_SYN_TIMEOUT
#define CT_SYN_TIMEOUT			60
#endif
#ifndef CT_CLOSE_TIMEOUT
#define CT_CLOSE_TIMEOUT		10
#endif
#ifndef CT_CONNECTION_LIFETIME_NONTCP
#define CT_CONNECTION_LIFETIME_NONTCP	60
#endif

enum ct_status {
	CT_NEW = 0,
	CT_ESTABLISHED = 1,
	CT_REPLY = 2,
	CT_REOPENED = 3,	/* a fresh SYN on a closing entry: decide again */
	CT_RELATED = 4,		/* an ICMP error about a tracked connection */
};

static __always_inline struct ct_entry *ct_map_lookup(__u8 is_tcp, struct ipv4_ct_tuple *tuple)
{
	if (is_tcp)
		return ct4_global.lookup(tuple);
	return ct_any4_global.lookup(tuple);
}

static __always_inline int ct_map_update(__u8 is_tcp, struct ipv4_ct_tuple *tuple,
					 struct ct_entry *entry)
{
	if (is_tcp)
		return ct4_global.update(tuple, entry);
	return ct_any4_global.update(tuple, entry);
}

static __always_inline void ct_tuple_of(struct pkt4 *p, __u8 side, struct ipv4_ct_tuple *t)
{
	t->daddr = p->daddr;
	t->saddr = p->saddr;
	t->dport = p->dport;
	t->sport = p->sport;
	t->nexthdr = p->protocol;
	t->flags = side;
	t->pad = 0;
}

static __always_inline void ct_reverse_tuple_of(struct pkt4 *p, __u8 side, struct ipv4_ct_tuple *t)
{
	t->daddr = p->saddr;
	t->saddr = p->daddr;
	t->dport = p->sport;
	t->sport = p->dport;
	t->nexthdr = p->protocol;
	t->flags = side;
	t->pad = 0;
}

/* Refresh an entry for one packet; returns the TCP flags seen for the
 * first time in this direction (for trace aggregation). */
static __always_inline __u8 ct_update_entry(struct ct_entry *e, struct pkt4 *p, int is_reply,
					    __u32 now)
{
	__u8 flags = p->tcp_flags;
	__u8 new_flags;

	if (is_reply) {
		__sync_fetch_and_add(&e->rx_packets, 1);
		__sync_fetch_and_add(&e->rx_bytes, p->len);
		new_flags = flags & ~e->rx_flags_seen;
		if (new_flags)
			e->rx_flags_seen |= flags;
	} else {
		__sync_fetch_and_add(&e->tx_packets, 1);
		__sync_fetch_and_add(&e->tx_bytes, p->len);
		new_flags = flags & ~e->tx_flags_seen;
		if (new_flags)
			e->tx_flags_seen |= flags;
	}

	if (p->protocol != IPPROTO_TCP) {
		e->lifetime = now + CT_CONNECTION_LIFETIME_NONTCP;
		return new_flags;
	}
	if (flags & TCP_FLAG_RST) {
		e->flags |= CT_F_TX_CLOSING | CT_F_RX_CLOSING;
	} else if (flags & TCP_FLAG_FIN) {
		e->flags |= is_reply ? CT_F_RX_CLOSING : CT_F_TX_CLOSING;
	}
	if (e->flags & (CT_F_TX_CLOSING | CT_F_RX_CLOSING)) {
		e->lifetime = now + CT_CLOSE_TIMEOUT;
	} else {
		if (!(flags & TCP_FLAG_SYN))
			e->flags |= CT_F_SEEN_NON_SYN;
		e->lifetime = now + ((e->flags & CT_F_SEEN_NON_SYN) ?
				     CT_CONNECTION_LIFETIME_TCP : CT_SYN_TIMEOUT);
	}
	return new_flags;
}

/* Look the packet up from one side (CT_EGRESS or CT_INGRESS): its own
 * entry (ESTABLISHED), else the opposite side's entry reversed (REPLY).
 * On a hit the entry is refreshed and *new_flags set. */
static __always_inline enum ct_status ct_lookup4(struct pkt4 *p, __u8 side, __u8 *new_flags,
						 struct ct_entry **found)
{
	struct ipv4_ct_tuple tuple = {};
	struct ct_entry *e;
	__u8 is_tcp = p->protocol == IPPROTO_TCP;
	__u32 now = bpf_mono_now();

	*new_flags = 0;
	*found = 0;
	ct_tuple_of(p, side, &tuple);
	e = ct_map_lookup(is_tcp, &tuple);
	if (e && e->lifetime >= now) {
		/* a new SYN on a connection that was closing is a new connection */
		if (is_tcp && (p->tcp_flags & TCP_FLAG_SYN) && !(p->tcp_flags & TCP_FLAG_ACK) &&
		    (e->flags & (CT_F_TX_CLOSING | CT_F_RX_CLOSING)))
			return CT_REOPENED;
		*new_flags = ct_update_entry(e, p, 0, now);
		*found = e;
		return CT_ESTABLISHED;
	}
	ct_reverse_tuple_of(p, side == CT_EGRESS ? CT_INGRESS : CT_EGRESS, &tuple);
	e = ct_map_lookup(is_tcp, &tuple);
	if (e && e->lifetime >= now) {
		*new_flags = ct_update_entry(e, p, 1, now);
		*found = e;
		return CT_REPLY;
	}
	return CT_NEW;
}

/* An ICMP error about a packet of a tracked connection passes as RELATED.
 * The quoted packet travelled the other way: sent by the local pod when the
 * error comes in (look up CT_EGRESS), received by it when the error goes
 * out (CT_INGRESS). */
static __always_inline int ct_is_related4(struct pkt4 *p, __u8 side)
{
	struct ipv4_ct_tuple tuple = {};
	struct ct_entry *e;
	__u8 is_tcp = p->inner_protocol == IPPROTO_TCP;

	if (!p->has_inner)
		return 0;
	tuple.daddr = p->inner_daddr;
	tuple.saddr = p->inner_saddr;
	tuple.dport = p->inner_dport;
	tuple.sport = p->inner_sport;
	tuple.nexthdr = p->inner_protocol;
	tuple.flags = side == CT_EGRESS ? CT_INGRESS : CT_EGRESS;
	e = ct_map_lookup(is_tcp, &tuple);
	return e && e->lifetime >= bpf_mono_now();
}

/* Create (or replace an expired/reopened) entry for an allowed new packet.
 * 0 on success, -DROP_CT_CREATE_FAILED otherwise. */
static __always_inline int ct_create4(struct lxc_ctx *c, __u8 side, __be16 proxy_port)
{
	struct ipv4_ct_tuple tuple = {};
	struct ct_entry entry = {};
	struct pkt4 *p = &c->p;
	__u8 is_tcp = p->protocol == IPPROTO_TCP;

	ct_tuple_of(p, side, &tuple);
	entry.tx_packets = 1;
	entry.tx_bytes = p->len;
	entry.tx_flags_seen = p->tcp_flags;
	entry.ifindex = (__u16)c->ifindex;
	entry.src_sec_id = c->src_id;
	entry.dst_sec_id = c->dst_id;
	entry.endpoint_id = c->ep_id;
	entry.proxy_port = proxy_port;
	entry.rev_nat_index = c->rev_nat;	/* replies get the service frontend back (lb.h) */
	if (!is_tcp) {
		entry.lifetime = bpf_mono_now() + CT_CONNECTION_LIFETIME_NONTCP;
	} else if (p->tcp_flags & (TCP_FLAG_RST | TCP_FLAG_FIN)) {
		entry.flags = CT_F_TX_CLOSING | ((p->tcp_flags & TCP_FLAG_RST) ? CT_F_RX_CLOSING : 0);
		entry.lifetime = bpf_mono_now() + CT_CLOSE_TIMEOUT;
	} else if (p->tcp_flags & TCP_FLAG_SYN) {
		entry.lifetime = bpf_mono_now() + CT_SYN_TIMEOUT;
	} else {
		/* mid-stream (e.g. CT entry evicted): allowed by policy, established */
		entry.flags = CT_F_SEEN_NON_SYN;
		entry.lifetime = bpf_mono_now() + CT_CONNECTION_LIFETIME_TCP;
	}
	if (ct_map_update(is_tcp, &tuple, &entry) < 0)
		return -DROP_CT_CREATE_FAILED;
	return 0;
}

#endif /* __PROPOLIS_CONNTRACK_H_ */
