/* SPDX-License-Identifier: Apache-2.0 */
/*
 * host_firewall.h - the node as an endpoint (Cilium's hostFirewall.enabled).
 *
 * The host endpoint is a cilium_lxc row for the node's InternalIP with
 * ENDPOINT_F_HOST, its endpoint id, identity reserved:host and the usual
 * enforcement and audit flags; its policy map is compiled from the
 * CiliumClusterwideNetworkPolicies whose nodeSelector selects the node. It is
 * enforced where the node's traffic passes a program:
 *   - bpf_host.c on the netdev: tc ingress (to the node) and tc egress (from
 *     the node; this also tracks the node's own connections, so their replies
 *     pass an ingress default deny: the node is never locked out of what it
 *     started itself, its NATS and API connections included);
 *   - bpf_lxc.c for a new connection between a local pod and its node (host
 *     ingress or egress, the pod as peer; Cilium decides it on cilium_host).
 * Without the row nothing here runs: host firewall off costs one lookup.
 */
#ifndef __PROPOLIS_HOST_FIREWALL_H_
#define __PROPOLIS_HOST_FIREWALL_H_

#include "lib/maps.h"
#include "lib/packet.h"
#include "lib/events.h"
#include "lib/policy.h"

/* The host endpoint owning this address, or NULL (a pod, or no host firewall). */
static __always_inline struct endpoint_info *host_endpoint4(__be32 ip)
{
	struct endpoint_key key = {};
	struct endpoint_info *ep;

	key.addr.ip4 = ip;
	key.family = ENDPOINT_KEY_IPV4;
	ep = cilium_lxc.lookup(&key);
	return ep && (ep->flags & ENDPOINT_F_HOST) ? ep : 0;
}

/* Make `c` speak for the host endpoint in one direction. */
static __always_inline void host_ctx_enter(struct lxc_ctx *c, struct endpoint_info *host, int egress)
{
	c->ep_id = host->lxc_id;
	c->dir = egress ? METRIC_DIR_EGRESS : METRIC_DIR_INGRESS;
	c->enforced = (host->flags & (egress ? ENDPOINT_F_EGRESS_ENFORCED : ENDPOINT_F_INGRESS_ENFORCED)) != 0;
	c->audit = (host->flags & ENDPOINT_F_POLICY_AUDIT) != 0;
}

/* The host policy's decision on a new connection with `peer`: 0 = allowed
 * (audited drops included), else -reason, its policy verdict already sent. */
static __always_inline int host_policy_decide(struct lxc_ctx *c, __u32 peer, int egress,
					      struct policy_result *pol)
{
	policy_check(c, peer, egress ? POLICY_EGRESS : POLICY_INGRESS, pol);
	if (pol->verdict < 0 && !policy_audit(c, pol)) {
		send_policy_verdict_notify(c, VERDICT_DROPPED, pol->match_type, 0, (__u16)(-pol->verdict));
		return pol->verdict;
	}
	if (!pol->audited)
		send_policy_verdict_notify(c, VERDICT_FORWARDED, pol->match_type, 0, 0);
	return 0;
}

/* A new connection between a local pod and its own node (c = the pod's
 * context; pod_egress: the pod connects to the node, else the node to the
 * pod): the host's policy in its direction, the pod as peer. 0 = go on, else
 * the drop is reported for the host endpoint and -reason returned. */
static __always_inline int host_policy_with_pod(struct lxc_ctx *c, int pod_egress)
{
	struct endpoint_info *host = host_endpoint4(pod_egress ? c->p.daddr : c->p.saddr);
	struct policy_result pol = {};
	__u16 ep_id = c->ep_id;
	__u8 dir = c->dir, enforced = c->enforced, audit = c->audit;
	int host_egress = !pod_egress;
	int ret;

	if (!host || !(host->flags & (host_egress ? ENDPOINT_F_EGRESS_ENFORCED : ENDPOINT_F_INGRESS_ENFORCED)))
		return 0;
	host_ctx_enter(c, host, host_egress);
	ret = host_policy_decide(c, pod_egress ? c->src_id : c->dst_id, host_egress, &pol);
	if (ret < 0)
		send_drop_notify(c, (__u8)(-ret), pol.match_type);
	c->ep_id = ep_id;	/* the pod's context again */
	c->dir = dir;
	c->enforced = enforced;
	c->audit = audit;
	return ret;
}

#endif /* __PROPOLIS_HOST_FIREWALL_H_ */
