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
 * closed (FIN both ways, or RST) 10, non-TCP 60. Expired entries count as absent;
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

/* TCP: fold one packet's flags into an entry's CT_F_* flags and return its new
 * expiry. The close timeout applies only once BOTH directions closed (FIN each
 * way, or a RST), as Cilium: a half-closed connection (shutdown(SHUT_WR)) still
 * waits for its answer. Shared with the NodePort SNAT entries (lib/nodeport.h). */
static __always_inline __u32 ct_tcp_lifetime(__u16 *ct_flags, __u8 tcp_flags, int is_reply, __u32 now)
{
	__u16 f = *ct_flags;

	if (tcp_flags & TCP_FLAG_RST)
		f |= CT_F_TX_CLOSING | CT_F_RX_CLOSING;
	else if (tcp_flags & TCP_FLAG_FIN)
		f |= is_reply ? CT_F_RX_CLOSING : CT_F_TX_CLOSING;
	if (!(tcp_flags & TCP_FLAG_SYN))
		f |= CT_F_SEEN_NON_SYN;
	*ct_flags = f;
	if ((f & (CT_F_TX_CLOSING | CT_F_RX_CLOSING)) == (CT_F_TX_CLOSING | CT_F_RX_CLOSING))
		return now + CT_CLOSE_TIMEOUT;
	return now + ((f & CT_F_SEEN_NON_SYN) ? CT_CONNECTION_LIFETIME_TCP : CT_SYN_TIMEOUT);
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
	e->lifetime = ct_tcp_lifetime(&e->flags, flags, is_reply, now);
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

/* An ICMP error passes as RELATED only when it is about a tracked connection
 * AND travels between that connection's two ends (as Cilium ties RELATED to
 * the connection's own addresses): the error goes back to whoever sent the
 * quoted packet, from whoever it was sent to. Checking the quoted tuple alone
 * let a pod with egress deny-all send errors (~1.4 KB of payload) anywhere by
 * quoting one of its own flows, and let any host push ICMP into a pod by
 * quoting someone else's flow.
 *
 * The quoted packet was sent by the local pod when the error comes in (side
 * CT_INGRESS) and received by it when the error goes out (CT_EGRESS). It is
 * either an original-direction packet of the connection (key = the quoted
 * tuple, created by the side that saw it) or a reply (key = the quoted tuple
 * reversed, created by our side), as ct_lookup4 finds ESTABLISHED and REPLY.
 * Errors from routers in between (TTL exceeded, fragmentation needed) are not
 * RELATED: policy decides them like any ICMP. */
static __always_inline int ct_is_related4(struct pkt4 *p, __u8 side)
{
	struct ipv4_ct_tuple tuple = {};
	struct ct_entry *e;
	__u8 is_tcp = p->inner_protocol == IPPROTO_TCP;
	__u32 now;

	if (!p->has_inner)
		return 0;
	if (p->inner_saddr != p->daddr || p->inner_daddr != p->saddr)
		return 0;	/* not between the quoted connection's two ends */
	now = bpf_mono_now();
	tuple.daddr = p->inner_daddr;
	tuple.saddr = p->inner_saddr;
	tuple.dport = p->inner_dport;
	tuple.sport = p->inner_sport;
	tuple.nexthdr = p->inner_protocol;
	tuple.flags = side == CT_EGRESS ? CT_INGRESS : CT_EGRESS;
	e = ct_map_lookup(is_tcp, &tuple);
	if (e && e->lifetime >= now)
		return 1;
	tuple.daddr = p->inner_saddr;
	tuple.saddr = p->inner_daddr;
	tuple.dport = p->inner_sport;
	tuple.sport = p->inner_dport;
	tuple.flags = side;
	e = ct_map_lookup(is_tcp, &tuple);
	return e && e->lifetime >= now;
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
	if (!is_tcp)
		entry.lifetime = bpf_mono_now() + CT_CONNECTION_LIFETIME_NONTCP;
	else	/* SYN: 60 s; mid-stream (entry evicted, allowed by policy): established */
		entry.lifetime = ct_tcp_lifetime(&entry.flags, p->tcp_flags, 0, bpf_mono_now());
	if (ct_map_update(is_tcp, &tuple, &entry) < 0)
		return -DROP_CT_CREATE_FAILED;
	return 0;
}

#endif /* __PROPOLIS_CONNTRACK_H_ */
