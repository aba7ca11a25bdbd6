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
 * frontend address (SNAT, the client's port kept; cilium_snat_v4_external
 * remembers the client) so the reply comes back through this node.
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

/* Route a translated packet out of the interface the FIB picks. */
static __always_inline int nodeport_redirect(struct __sk_buff *skb, struct pkt4 *p)
{
	struct bpf_fib_lookup fib = {};
	int ret;

	fib.family = AF_INET;
	fib.l4_protocol = p->protocol;
	fib.sport = p->sport;
	fib.dport = p->dport;
	fib.tot_len = (__u16)(skb->len - ETH_HLEN);
	fib.ipv4_src = p->saddr;
	fib.ipv4_dst = p->daddr;
	fib.ifindex = skb->ifindex;
	ret = bpf_fib_lookup(skb, &fib, sizeof(fib), 0);
	if (ret != BPF_FIB_LKUP_RET_SUCCESS && ret != BPF_FIB_LKUP_RET_NO_NEIGH)
		return CTX_ACT_OK;	/* let the stack decide (and count it) */
	return pp_redirect_neigh(fib.ifindex, 0, 0, 0);
}

/* The reply of a SNATed NodePort flow: restore client and frontend. 1 = done. */
static __always_inline int nodeport_rev_snat(struct __sk_buff *skb, struct pkt4 *p)
{
	struct ipv4_ct_tuple tuple = {};
	struct ipv4_nat_entry *nat;
	__be32 client;
	__be16 client_port;
	__u16 rev_nat;

	ct_tuple_of(p, CT_INGRESS, &tuple);
	nat = snat4_external.lookup(&tuple);
	if (!nat)
		return 0;
	client = nat->to_addr;
	client_port = nat->to_port;
	rev_nat = nat->rev_nat_index;
	if (lb4_rewrite(skb, p, LB_REWRITE_DST, client, client_port) < 0 ||
	    lb4_rev_nat(skb, p, rev_nat) < 0)
		return 0;
	return 1;
}

/* cil_from_netdev body: CTX_ACT_OK for everything that is not a NodePort flow. */
static __always_inline int nodeport_lb4(struct __sk_buff *skb)
{
	struct lxc_ctx c = {};
	struct lb4_key key = {};
	struct ipv4_ct_tuple tuple = {};
	struct ipv4_nat_entry nat = {};
	struct endpoint_key epkey = {};
	struct lb4_service *svc;
	struct lb4_backend *be = 0;
	__be32 frontend, client;
	__be16 client_port;

	if (skb->protocol != pp_htons(ETH_P_IP))
		return CTX_ACT_OK;
	c.dir = METRIC_DIR_INGRESS;
	c.ifindex = skb->ifindex;
	c.p.len = skb->len;
	if (parse_ipv4(skb, &c.p) < 0)
		return CTX_ACT_OK;	/* the host's business */
	if (c.p.protocol != IPPROTO_TCP && c.p.protocol != IPPROTO_UDP)
		return CTX_ACT_OK;
	if (nodeport_rev_snat(skb, &c.p))
		return nodeport_redirect(skb, &c.p);

	svc = lb4_lookup_service(&c.p, &key);
	if (!svc || !(svc->flags & (SVC_FLAG_NODEPORT | SVC_FLAG_EXTERNAL_IP | SVC_FLAG_LOADBALANCER)))
		return CTX_ACT_OK;
	c.src_id = ID_WORLD;
	if (!lb4_backend_of_flow(&c.p, &key, svc, &be) || !be)
		return send_drop_notify(&c, DROP_NO_SERVICE, POLICY_MATCH_NONE);
	frontend = c.p.daddr;
	client = c.p.saddr;
	client_port = c.p.sport;
	if (lb4_rewrite(skb, &c.p, LB_REWRITE_DST, be->address, be->port) < 0)
		return send_drop_notify(&c, DROP_INVALID, POLICY_MATCH_NONE);

	epkey.addr.ip4 = be->address;
	epkey.family = ENDPOINT_KEY_IPV4;
	if (cilium_lxc.lookup(&epkey)) {
		skb->mark = MARK_MAGIC_NODEPORT | svc->rev_nat_index;
		return CTX_ACT_OK;	/* the stack routes it to the pod's lxc */
	}

	/* backend on another node: SNAT to the frontend so the reply returns here */
	if (lb4_rewrite(skb, &c.p, LB_REWRITE_SRC, frontend, client_port) < 0)
		return send_drop_notify(&c, DROP_INVALID, POLICY_MATCH_NONE);
	ct_reverse_tuple_of(&c.p, CT_INGRESS, &tuple);
	nat.created = bpf_mono_now();
	nat.to_addr = client;
	nat.to_port = client_port;
	nat.rev_nat_index = svc->rev_nat_index;
	snat4_external.update(&tuple, &nat);
	return nodeport_redirect(skb, &c.p);
}

#endif /* __PROPOLIS_NODEPORT_H_ */
