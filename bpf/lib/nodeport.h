/* SPDX-License-Identifier: Apache-2.0 */
/*
 * nodeport.h - NodePort (and externalIPs / LoadBalancer IPs) on the node's
 * underlay interface: cil_from_netdev in bpf_host.c, as Cilium's bpf_host.c.
 *
 * A packet to <node IP>:<nodePort> is DNATed to a backend chosen like a
 * ClusterIP one (lib/lb.h). A LOCAL backend gets the packet through the
 * stack with skb->mark = MARK_MAGIC_NODEPORT|rev_nat_index, so
 * cil_to_container decides the backend's ingress policy with the client's
 * real address (externalTrafficPolicy: Local keeps only such backends) and
 * remembers the frontend for the reply. A backend on ANOTHER node
 * (externalTrafficPolicy: Cluster) also gets its source rewritten to the
 * frontend address and a port allocated for the flow (SNAT, below), so the
 * reply comes back through this node.
 *
 * Packets whose source became a local address are routed here with
 * bpf_fib_lookup + bpf_redirect_neigh: the stack would drop them as martians.
 */
#ifndef __PROPOLIS_NODEPORT_H_
#define __PROPOLIS_NODEPORT_H_

#include "lib/lb.h"
#include "lib/events.h"

#ifndef AF_INET
#define AF_INET 2
#endif

/* bcc's declaration of this helper predates its final 4-argument form */
static long (*pp_redirect_neigh)(__u32 ifindex, void *params, int plen, __u64 flags) =
	(void *)BPF_FUNC_redirect_neigh;

/* Route a translated packet out of the interface the FIB picks; a failed
 * lookup is a reported drop. Why tot_len stays 0: the kernel then checks the
 * skb against the egress MTU GSO-aware (is_skb_forwardable); with
 * tot_len = skb->len every GSO/GRO packet above the MTU was FRAG_NEEDED,
 * went back to the stack already translated and died there as a martian,
 * so large NodePort transfers stalled. NOT_FWDED (a local destination) is
 * the stack's to deliver. */
static __always_inline int nodeport_redirect(struct __sk_buff *skb, struct lxc_ctx *c)
{
	struct bpf_fib_lookup fib = {};
	int ret;

	fib.family = AF_INET;
	fib.l4_protocol = c->p.protocol;
	fib.sport = c->p.sport;
	fib.dport = c->p.dport;
	fib.ipv4_src = c->p.saddr;
	fib.ipv4_dst = c->p.daddr;
	fib.ifindex = skb->ifindex;
	ret = bpf_fib_lookup(skb, &fib, sizeof(fib), 0);
	if (ret == BPF_FIB_LKUP_RET_NOT_FWDED)
		return CTX_ACT_OK;
	if (ret == BPF_FIB_LKUP_RET_FRAG_NEEDED)
		return send_drop_notify(c, DROP_FRAG_NEEDED, POLICY_MATCH_NONE);
	if (ret != BPF_FIB_LKUP_RET_SUCCESS && ret != BPF_FIB_LKUP_RET_NO_NEIGH)
		return send_drop_notify(c, DROP_FIB_LOOKUP, POLICY_MATCH_NONE);
	skb->mark = MARK_MAGIC_SNAT_DONE;	/* the host firewall's egress is not for it (bpf_host.c) */
	return pp_redirect_neigh(fib.ifindex, 0, 0, 0);
}

/* SNAT port range and collision retries, Cilium's NODEPORT_PORT_MIN_NAT /
 * NODEPORT_PORT_MAX_NAT / SNAT_COLLISION_RETRIES (overridable with -D). */
#ifndef NODEPORT_PORT_MIN_NAT
#define NODEPORT_PORT_MIN_NAT	32768
#endif
#ifndef NODEPORT_PORT_MAX_NAT
#define NODEPORT_PORT_MAX_NAT	65535
#endif
#ifndef SNAT_COLLISION_RETRIES
#define SNAT_COLLISION_RETRIES	128
#endif

/* Refresh a SNAT entry for one packet of its flow: conntrack's lifetimes and
 * TCP close tracking; a client's new SYN on its old tuple starts afresh. */
static __always_inline __u32 snat4_lifetime(struct ipv4_nat_entry *e, struct pkt4 *p, int is_reply,
					    __u32 now)
{
	if (p->protocol != IPPROTO_TCP)
		return now + CT_CONNECTION_LIFETIME_NONTCP;
	if (!is_reply && (p->tcp_flags & TCP_FLAG_SYN) && !(p->tcp_flags & TCP_FLAG_ACK))
		e->flags = 0;
	return ct_tcp_lifetime(&e->flags, p->tcp_flags, is_reply, now);
}

/*
 * The SNAT port of a flow to a backend on another node (p: already DNATed,
 * source still the client). Why allocate: keeping the client's port made two
 * clients with the same source port share one reply tuple, so one client got
 * the other's replies (UDP) or a reset (TCP). The flow keeps the port its
 * forward entry names while the reverse entry still maps back to this client;
 * else the client's own port if it is in the NAT range and free, else random
 * ports in the range, SNAT_COLLISION_RETRIES times. Expired entries are free.
 * Network-order port, 0 when none is free (drop NAT_NO_MAPPING, as Cilium).
 */
static __always_inline __be16 snat4_port(struct pkt4 *p, __be32 frontend, __u16 rev_nat_index, __u32 now)
{
	struct ipv4_ct_tuple fkey = {}, rkey = {};
	struct ipv4_nat_entry fwd = {}, rev = {}, *f, *r;
	__u16 port = pp_ntohs(p->sport);
	int i;

	ct_tuple_of(p, CT_EGRESS, &fkey);
	rkey.saddr = p->daddr;
	rkey.daddr = frontend;
	rkey.sport = p->dport;
	rkey.nexthdr = p->protocol;
	rkey.flags = CT_INGRESS;
	f = snat4_external.lookup(&fkey);
	if (f) {
		rkey.dport = f->to_port;
		r = snat4_external.lookup(&rkey);
		if (r && r->lifetime >= now && r->to_addr == p->saddr && r->to_port == p->sport) {
			r->lifetime = snat4_lifetime(r, p, 0, now);
			return rkey.dport;
		}
	}
	rev.to_addr = p->saddr;
	rev.to_port = p->sport;
	rev.rev_nat_index = rev_nat_index;
	rev.lifetime = snat4_lifetime(&rev, p, 0, now);
	for (i = 0; i < SNAT_COLLISION_RETRIES; i++) {
		if (i > 0 || port < NODEPORT_PORT_MIN_NAT || port > NODEPORT_PORT_MAX_NAT)
			port = NODEPORT_PORT_MIN_NAT + (__u16)(bpf_get_prandom_u32() %
				(NODEPORT_PORT_MAX_NAT - NODEPORT_PORT_MIN_NAT + 1));
		rkey.dport = pp_htons(port);
		r = snat4_external.lookup(&rkey);
		if (!r) {
			if (snat4_external.insert(&rkey, &rev) == 0)
				goto found;
		} else if (r->lifetime < now) {
			snat4_external.update(&rkey, &rev);
			goto found;
		}
	}
	return 0;
found:
	fwd.to_addr = frontend;
	fwd.to_port = rkey.dport;
	fwd.rev_nat_index = rev_nat_index;
	fwd.lifetime = rev.lifetime;
	snat4_external.update(&fkey, &fwd);
	return rkey.dport;
}

/* The reply of a SNATed NodePort flow: restore client and frontend. 1 = done. */
static __always_inline int nodeport_rev_snat(struct __sk_buff *skb, struct pkt4 *p)
{
	struct ipv4_ct_tuple tuple = {};
	struct ipv4_nat_entry *nat;
	__be32 client;
	__be16 client_port;
	__u16 rev_nat;
	__u32 now = bpf_mono_now();

	ct_tuple_of(p, CT_INGRESS, &tuple);
	nat = snat4_external.lookup(&tuple);
	if (!nat || nat->lifetime < now)
		return 0;	/* expired: the port may belong to another client by now */
	nat->lifetime = snat4_lifetime(nat, p, 1, now);
	client = nat->to_addr;
	client_port = nat->to_port;
	rev_nat = nat->rev_nat_index;
	if (lb4_rewrite(skb, p, LB_REWRITE_DST, client, client_port) < 0 ||
	    lb4_rev_nat(skb, p, rev_nat) < 0)
		return 0;
	return 1;
}

/* Rewrite one address of the packet (outer header or the quoted one) with its
 * IP header checksum. An ICMP checksum covers the quoted header, whose sum
 * does not change when its own checksum is updated with it. */
static __always_inline int icmp_err_store_addr(struct __sk_buff *skb, __u32 ip_off, __u32 field,
					       __be32 old_addr, __be32 new_addr)
{
	if (old_addr == new_addr)
		return 0;
	if (bpf_l3_csum_replace(skb, ip_off + 10, old_addr, new_addr, 4) < 0 ||
	    bpf_skb_store_bytes(skb, ip_off + field, &new_addr, 4, 0) < 0)
		return -DROP_INVALID;
	return 0;
}

/* A quoted port, with the ICMP checksum (no pseudo header). */
static __always_inline int icmp_err_store_port(struct __sk_buff *skb, __u32 icmp_off, __u32 port_off,
					       __be16 old_port, __be16 new_port)
{
	if (old_port == new_port)
		return 0;
	if (bpf_l4_csum_replace(skb, icmp_off + 2, old_port, new_port, 2) < 0 ||
	    bpf_skb_store_bytes(skb, port_off, &new_port, 2, 0) < 0)
		return -DROP_INVALID;
	return 0;
}

/*
 * RFC 5508 on the netdev: an ICMP error about a NodePort reply we translated
 * (quoted: frontend:nodePort -> client, e.g. fragmentation needed from a
 * router toward the client) goes to the backend, quoting the packet as the
 * backend sent it: backend:port -> client (local backend), or
 * backend:port -> frontend:allocated port (SNATed to another node). Without
 * it the backend never learns the path MTU and large replies black-hole.
 * The flow is found through its CT_SERVICE entry (client -> frontend). For
 * a remote backend the error also comes from the frontend (a hop of its path):
 * the router's own address could be the backend node's, a martian there.
 * 1 = translated for a local backend (the stack routes it), 2 = for a remote
 * one (to be redirected), 0 = not about a NodePort flow, <0 = drop.
 */
static __always_inline int nodeport_icmp_err(struct __sk_buff *skb, struct pkt4 *p)
{
	struct ipv4_ct_tuple tuple = {};
	struct endpoint_key epkey = {};
	struct ipv4_nat_entry *fwd;
	struct lb4_backend *be;
	struct ct_entry *e;
	__u32 icmp_off, inner_off, inner_l4, id;
	__be32 client = p->inner_daddr, frontend = p->inner_saddr;
	__be16 client_port = p->inner_dport, to_port;
	__u8 vihl;
	int local;

	if (!p->has_inner || (p->inner_protocol != IPPROTO_TCP && p->inner_protocol != IPPROTO_UDP) ||
	    p->inner_saddr != p->daddr)
		return 0;
	tuple.saddr = client;
	tuple.daddr = frontend;
	tuple.sport = client_port;
	tuple.dport = p->inner_sport;
	tuple.nexthdr = p->inner_protocol;
	tuple.flags = CT_SERVICE;
	e = ct_map_lookup(p->inner_protocol == IPPROTO_TCP, &tuple);
	if (!e || !e->rev_nat_index)
		return 0;
	id = (__u32)e->rx_packets;
	be = lb4_backends.lookup(&id);
	if (!be)
		return 0;
	epkey.addr.ip4 = be->address;
	epkey.family = ENDPOINT_KEY_IPV4;
	local = cilium_lxc.lookup(&epkey) != 0;
	to_port = client_port;
	if (!local) {
		tuple.daddr = be->address;
		tuple.dport = be->port;
		tuple.flags = CT_EGRESS;
		fwd = snat4_external.lookup(&tuple);
		if (!fwd)
			return 0;
		to_port = fwd->to_port;
		client = frontend;	/* the backend sent its reply to frontend:to_port */
	}

	if (bpf_skb_load_bytes(skb, ETH_HLEN, &vihl, 1) < 0)
		return -DROP_INVALID;
	icmp_off = ETH_HLEN + ((__u32)(vihl & 0x0f)) * 4;
	inner_off = icmp_off + 8;
	if (bpf_skb_load_bytes(skb, inner_off, &vihl, 1) < 0)
		return -DROP_INVALID;
	inner_l4 = inner_off + ((__u32)(vihl & 0x0f)) * 4;
	if ((!local && icmp_err_store_addr(skb, ETH_HLEN, 12, p->saddr, frontend) < 0) ||
	    icmp_err_store_addr(skb, ETH_HLEN, 16, p->daddr, be->address) < 0 ||
	    icmp_err_store_addr(skb, inner_off, 12, p->inner_saddr, be->address) < 0 ||
	    icmp_err_store_addr(skb, inner_off, 16, p->inner_daddr, client) < 0 ||
	    icmp_err_store_port(skb, icmp_off, inner_l4, p->inner_sport, be->port) < 0 ||
	    icmp_err_store_port(skb, icmp_off, inner_l4 + 2, p->inner_dport, to_port) < 0)
		return -DROP_INVALID;
	if (!local)
		p->saddr = frontend;
	p->daddr = be->address;
	p->inner_saddr = be->address;
	p->inner_sport = be->port;
	p->inner_daddr = client;
	p->inner_dport = to_port;
	return local ? 1 : 2;
}

/* cil_from_netdev body: CTX_ACT_OK for everything that is not a NodePort flow. */
static __always_inline int nodeport_lb4(struct __sk_buff *skb)
{
	struct lxc_ctx c = {};
	struct lb4_key key = {};
	struct endpoint_key epkey = {};
	struct lb4_service *svc;
	struct lb4_backend *be = 0;
	__be32 frontend;
	__be16 snat_port;

	if (skb->protocol != pp_htons(ETH_P_IP))
		return CTX_ACT_OK;
	c.dir = METRIC_DIR_INGRESS;
	c.ifindex = skb->ifindex;
	c.p.len = skb->len;
	if (parse_ipv4(skb, &c.p) < 0)
		return CTX_ACT_OK;	/* the host's business */
	if (c.p.protocol == IPPROTO_ICMP) {
		int ret = nodeport_icmp_err(skb, &c.p);

		if (ret < 0)
			return send_drop_notify(&c, -ret, POLICY_MATCH_NONE);
		return ret == 2 ? nodeport_redirect(skb, &c) : CTX_ACT_OK;
	}
	if (c.p.protocol != IPPROTO_TCP && c.p.protocol != IPPROTO_UDP)
		return CTX_ACT_OK;
	if (nodeport_rev_snat(skb, &c.p))
		return nodeport_redirect(skb, &c);

	svc = lb4_lookup_service(&c.p, &key);
	if (!svc || !(svc->flags & (SVC_FLAG_NODEPORT | SVC_FLAG_EXTERNAL_IP | SVC_FLAG_LOADBALANCER |
			     SVC_FLAG_HOSTPORT)))
		return CTX_ACT_OK;
	c.src_id = ID_WORLD;
	if (!lb4_backend_of_flow(&c.p, &key, svc, &be, 0) || !be)
		return send_drop_notify(&c, DROP_NO_SERVICE, POLICY_MATCH_NONE);
	frontend = c.p.daddr;
	if (lb4_rewrite(skb, &c.p, LB_REWRITE_DST, be->address, be->port) < 0)
		return send_drop_notify(&c, DROP_INVALID, POLICY_MATCH_NONE);

	epkey.addr.ip4 = be->address;
	epkey.family = ENDPOINT_KEY_IPV4;
	if (cilium_lxc.lookup(&epkey)) {
		skb->mark = MARK_MAGIC_NODEPORT | svc->rev_nat_index;
		return CTX_ACT_OK;	/* the stack routes it to the pod's lxc */
	}

	/* backend on another node: SNAT to the frontend so the reply returns here */
	snat_port = snat4_port(&c.p, frontend, svc->rev_nat_index, bpf_mono_now());
	if (!snat_port)
		return send_drop_notify(&c, DROP_NAT_NO_MAPPING, POLICY_MATCH_NONE);
	if (lb4_rewrite(skb, &c.p, LB_REWRITE_SRC, frontend, snat_port) < 0)
		return send_drop_notify(&c, DROP_INVALID, POLICY_MATCH_NONE);
	return nodeport_redirect(skb, &c);
}

#endif /* __PROPOLIS_NODEPORT_H_ */
