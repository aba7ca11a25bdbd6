/* SPDX-License-Identifier: Apache-2.0 */
/*
 * proxy.h - hand a flow to a local proxy listener, keeping its original
 * destination (Cilium's proxy redirect; used by the L7 proxy and the DNS
 * proxy, UDP included: proxy_deliver_udp).
 *
 * The generic contract: a policy entry carries a proxy port; a connection
 * whose policy decision has one is delivered to the socket listening on that
 * port in the node namespace (IP_TRANSPARENT, bound to 0.0.0.0:port). The
 * client keeps talking to the original address: the accepted socket's local
 * address is the original destination (getsockname).
 *
 * How a packet reaches the proxy socket:
 *  - at tc ingress of the lxc (cil_from_container, pod egress) the packet is
 *    assigned the listener (bpf_sk_assign; a packet of a connection the proxy
 *    already holds needs no assignment) and marked MARK_MAGIC_TO_PROXY; the node's policy
 *    route for that mark (fwmark 0x4c500000/0xffff0000 -> table 2004,
 *    "local 0.0.0.0/0 dev lo", installed by the proxy) delivers it locally;
 *  - at tc egress of the lxc (cil_to_container, pod ingress) bpf_sk_assign
 *    is not allowed, so the packet is marked, given our own MAC as
 *    destination and redirected into the same interface's ingress, where
 *    cil_from_container sees the mark and assigns it (a pod's own packets
 *    cross the veth scrubbed, so only we can set that mark).
 * No listener = no socket = the packet is dropped: fail closed.
 *
 * The proxy's onward connection leaves with the client's address as source
 * (IP_TRANSPARENT) and SO_MARK MARK_MAGIC_PROXY_UPSTREAM, so the server's own
 * L3/L4 policy still decides it. Its replies come back to the proxy socket:
 *  - from a local server: its conntrack entry is flagged CT_F_PROXY_UPSTREAM,
 *    so cil_from_container delivers the replies to the proxy;
 *  - from a remote server: they arrive for the client's address, and
 *    cil_to_container finds the proxy's socket for their tuple (one socket
 *    lookup, only for packets conntrack does not know) and re-injects them.
 */
#ifndef __PROPOLIS_PROXY_H_
#define __PROPOLIS_PROXY_H_

#include "lib/common.h"
#include "lib/drop.h"
#include "lib/maps.h"
#include "lib/packet.h"

#define PROXY_MARK_MASK			0xffff0000
#define MARK_MAGIC_TO_PROXY		0x4c500000	/* "LP": low 16 bits = listener port, 0 = established only */
#define MARK_MAGIC_PROXY_UPSTREAM	0x4c550000	/* "LU": set by a proxy on its onward connections */
#define PROXY_UPSTREAM_INGRESS		1		/* low bits: which proxy (an ingress one is not redirected again) */
#define PROXY_UPSTREAM_EGRESS		2

#define CT_F_PROXY_UPSTREAM		(1 << 8)	/* a proxy's onward connection: replies go back to it */

static __always_inline __u16 proxy_to_proxy_port(struct __sk_buff *skb, int *marked)
{
	*marked = (skb->mark & PROXY_MARK_MASK) == MARK_MAGIC_TO_PROXY;
	return (__u16)(skb->mark & 0xffff);
}

/* Which proxy sent this packet (PROXY_UPSTREAM_*), 0 = none. */
static __always_inline __u32 proxy_upstream_of(struct __sk_buff *skb)
{
	if ((skb->mark & PROXY_MARK_MASK) != MARK_MAGIC_PROXY_UPSTREAM)
		return 0;
	return skb->mark & 0xffff;
}

static __always_inline void proxy_tuple(struct pkt4 *p, struct bpf_sock_tuple *t)
{
	t->ipv4.saddr = p->saddr;
	t->ipv4.daddr = p->daddr;
	t->ipv4.sport = p->sport;
	t->ipv4.dport = p->dport;
}

/* A connected socket of the node namespace for this packet's tuple: only a
 * transparent proxy socket can own a pod's address there. */
static __always_inline int proxy_owns_tuple(struct __sk_buff *skb, struct pkt4 *p)
{
	struct bpf_sock_tuple t = {};
	struct bpf_sock *sk;
	int owned;

	if (p->protocol != IPPROTO_TCP)
		return 0;
	/* a pure SYN opens a connection toward the pod: never a reply to the
	 * proxy's onward connection, so new connections skip the socket lookup */
	if ((p->tcp_flags & TCP_FLAG_SYN) && !(p->tcp_flags & TCP_FLAG_ACK))
		return 0;
	proxy_tuple(p, &t);
	sk = bpf_skc_lookup_tcp(skb, &t, sizeof(t.ipv4), BPF_F_CURRENT_NETNS, 0);
	if (!sk)
		return 0;
	owned = sk->state != BPF_TCP_LISTEN && sk->state != BPF_TCP_TIME_WAIT;
	bpf_sk_release(sk);
	return owned;
}

/* UDP (the DNS proxy): every datagram goes to the unconnected listener on
 * listener_port, which reads the original destination with IP_RECVORIGDSTADDR
 * and answers from a socket bound to it. No listener = dropped (fail closed). */
static __always_inline int proxy_deliver_udp(struct __sk_buff *skb, struct pkt4 *p, __u16 listener_port)
{
	struct bpf_sock_tuple t = {};
	struct bpf_sock *sk;
	long ret;

	if (!listener_port)
		return -DROP_PROXY_LOOKUP_FAILED;
	proxy_tuple(p, &t);
	t.ipv4.dport = pp_htons(listener_port);
	sk = bpf_sk_lookup_udp(skb, &t, sizeof(t.ipv4), BPF_F_CURRENT_NETNS, 0);
	if (!sk)
		return -DROP_PROXY_LOOKUP_FAILED;	/* the proxy is down: fail closed */
	ret = bpf_sk_assign(skb, sk, 0);
	bpf_sk_release(sk);
	if (ret < 0)
		return -DROP_PROXY_SET_FAILED;
	skb->mark = MARK_MAGIC_TO_PROXY | listener_port;
	return CTX_ACT_OK;
}

/* tc ingress: assign the packet its proxy socket (the established one of its
 * tuple, else the listener on listener_port) and mark it for local delivery. */
static __always_inline int proxy_deliver(struct __sk_buff *skb, struct pkt4 *p, __u16 listener_port)
{
	struct bpf_sock_tuple t = {};
	struct bpf_sock *sk;
	long ret;

	if (p->protocol == IPPROTO_UDP)
		return proxy_deliver_udp(skb, p, listener_port);
	if (p->protocol != IPPROTO_TCP)
		return -DROP_PROXY_UNSUPP_PROTO;
	proxy_tuple(p, &t);
	sk = bpf_skc_lookup_tcp(skb, &t, sizeof(t.ipv4), BPF_F_CURRENT_NETNS, 0);
	if (sk) {
		/* a connected (or half-open) socket of this tuple: the marked packet's local
		 * route and the stack's own lookup find it, nothing to assign */
		ret = sk->state != BPF_TCP_LISTEN && sk->state != BPF_TCP_TIME_WAIT;
		bpf_sk_release(sk);
		if (ret)
			goto mark;
	}
	if (!listener_port)
		return -DROP_PROXY_LOOKUP_FAILED;
	t.ipv4.dport = pp_htons(listener_port);
	sk = bpf_skc_lookup_tcp(skb, &t, sizeof(t.ipv4), BPF_F_CURRENT_NETNS, 0);
	if (!sk)
		return -DROP_PROXY_LOOKUP_FAILED;	/* the proxy is down: fail closed */
	if (sk->state != BPF_TCP_LISTEN) {
		bpf_sk_release(sk);
		return -DROP_PROXY_LOOKUP_FAILED;
	}
	ret = bpf_sk_assign(skb, sk, 0);
	bpf_sk_release(sk);
	if (ret < 0)
		return -DROP_PROXY_SET_FAILED;
mark:
	skb->mark = MARK_MAGIC_TO_PROXY | listener_port;
	return CTX_ACT_OK;
}

/* tc egress: back into this interface's ingress, marked, addressed to us. */
static __always_inline int proxy_reinject(struct __sk_buff *skb, struct pkt4 *p, __u16 listener_port)
{
	__u8 mac[6];

	if (p->protocol != IPPROTO_TCP)
		return -DROP_PROXY_UNSUPP_PROTO;
	if (bpf_skb_load_bytes(skb, 6, mac, 6) < 0 || bpf_skb_store_bytes(skb, 0, mac, 6, 0) < 0)
		return -DROP_INVALID;
	skb->mark = MARK_MAGIC_TO_PROXY | listener_port;
	return bpf_redirect(skb->ifindex, BPF_F_INGRESS);
}

/* Hand a packet to the proxy from either program. */
static __always_inline int proxy_redirect(struct __sk_buff *skb, struct pkt4 *p, int egress,
					  __u16 listener_port)
{
	return egress ? proxy_deliver(skb, p, listener_port) : proxy_reinject(skb, p, listener_port);
}

/* A tracked packet the proxy must get: a redirected connection's own
 * direction (its entry was created on this side with a proxy port), or a
 * reply to a proxy's onward connection. Returns 1 with *ret set when so. */
static __always_inline int proxy_tracked(struct __sk_buff *skb, struct pkt4 *p, int egress,
					 enum ct_status status, struct ct_entry *entry, int *ret)
{
	if (!entry)
		return 0;
	if (status == CT_ESTABLISHED && entry->proxy_port) {
		*ret = proxy_redirect(skb, p, egress, pp_ntohs(entry->proxy_port));
		return 1;
	}
	if (egress && status == CT_REPLY && (entry->flags & CT_F_PROXY_UPSTREAM)) {
		*ret = proxy_deliver(skb, p, 0);
		return 1;
	}
	return 0;
}

/* Flag the entry just created for a proxy's onward connection. */
static __always_inline void proxy_flag_upstream(struct pkt4 *p, __u8 side)
{
	struct ipv4_ct_tuple tuple = {};
	struct ct_entry *e;

	ct_tuple_of(p, side, &tuple);
	e = ct_map_lookup(p->protocol == IPPROTO_TCP, &tuple);
	if (e)
		e->flags |= CT_F_PROXY_UPSTREAM;
}

#endif /* __PROPOLIS_PROXY_H_ */
