/* SPDX-License-Identifier: Apache-2.0 */
/*
 * bpf_host.c - the program on the node's underlay interface (eth0):
 *
 *   cil_from_netdev  tc INGRESS of the node's netdev: NodePort, externalIPs
 *                    and LoadBalancer IPs (lib/nodeport.h), and the replies
 *                    of NodePort flows SNATed to a backend on another node;
 *                    then the host firewall's ingress (lib/host_firewall.h).
 *   cil_to_netdev    tc EGRESS of the node's netdev: the host firewall's
 *                    egress, then encryption.strictMode (below), as
 *                    Cilium's to-netdev.
 *
 * Compiled in the same unit as bpf_lxc.c (the loader appends it), so both
 * share one set of pinned maps and one compile per node.
 */
#include "lib/common.h"
#include "lib/maps.h"
#include "lib/lb.h"
#include "lib/nodeport.h"
#include "lib/host_firewall.h"

/*
 * The node's own traffic on its netdev (hostFirewall, lib/host_firewall.h):
 * `egress` = leaving the node. A new connection meets the host policy once;
 * conntrack lets the rest and the replies through. Tracked whether or not a
 * direction is enforced, so turning enforcement on never cuts what the node
 * already has open. Pods' and forwarded traffic is not the host's: passed.
 */
static __always_inline int host_firewall4(struct __sk_buff *skb, int egress)
{
	struct endpoint_info *host;
	struct policy_result pol = {};
	struct lxc_ctx c = {};
	struct ct_entry *entry;
	enum ct_status status;
	__u8 side = egress ? CT_EGRESS : CT_INGRESS;
	__u8 new_flags = 0;
	int ret;

	if (skb->protocol != pp_htons(ETH_P_IP))
		return CTX_ACT_OK;
	/* NodePort traffic the node forwards with its own address (lib/nodeport.h
	 * nodeport_redirect) is the backend's business, not the host's. Trusted
	 * only on a packet that came in from an interface: a host process can set
	 * any mark (SO_MARK), but its packets were not received anywhere. */
	if (egress && (skb->mark & MARK_MAGIC_MASK) == MARK_MAGIC_SNAT_DONE && skb->ingress_ifindex) {
		skb->mark = 0;
		return CTX_ACT_OK;
	}
	c.ifindex = skb->ifindex;
	c.p.len = skb->len;
	if (parse_ipv4(skb, &c.p) < 0)
		return CTX_ACT_OK;	/* not ours to judge: the stack drops what it cannot parse */
	host = host_endpoint4(egress ? c.p.saddr : c.p.daddr);
	if (!host)
		return CTX_ACT_OK;
	host_ctx_enter(&c, host, egress);
	c.src_id = egress ? ID_HOST : resolve_identity4(c.p.saddr);
	c.dst_id = egress ? resolve_identity4(c.p.daddr) : ID_HOST;
	if (ct_is_related4(&c.p, side))
		return CTX_ACT_OK;
	status = ct_lookup4(&c.p, side, &new_flags, &entry);
	if (status == CT_ESTABLISHED || status == CT_REPLY)
		return CTX_ACT_OK;
	if (c.enforced) {
		ret = host_policy_decide(&c, egress ? c.dst_id : c.src_id, egress, &pol);
		if (ret < 0)
			return send_drop_notify(&c, (__u8)(-ret), pol.match_type);
	}
	ret = ct_create4(&c, side, 0);
	if (ret < 0 && c.enforced)
		return send_drop_notify(&c, (__u8)(-ret), pol.match_type);
	return CTX_ACT_OK;
}

int cil_from_netdev(struct __sk_buff *skb)
{
	int ret = nodeport_lb4(skb);

	if (ret != CTX_ACT_OK)
		return ret;	/* a NodePort flow on its way to a backend */
	return host_firewall4(skb, 0);
}

/* A remote node's address (encryption.strictMode.allowRemoteNodeIdentities:
 * node and pod CIDRs overlap, so node traffic must not be taken for pods'). */
static __always_inline int identity_is_node(__u32 id)
{
	return id == ID_HOST || id == ID_REMOTE_NODE || id == ID_KUBE_APISERVER ||
	       (id >> 25) == 1;	/* node-local identities of labelled nodes (1 << 25 ...) */
}

/*
 * encryption.strictMode (Cilium's strict_allow): a packet about to leave the
 * node's underlay with source AND destination in the strict CIDR is pod
 * traffic that did not go through cilium_wg0 (what did leaves as UDP between
 * node addresses), so it is dropped as UNENCRYPTED_TRAFFIC, counted and
 * reported like every drop, attributed to the local pod that sent it.
 * Why here and not on the lxc: only here is it known that the packet really
 * leaves the node unencrypted, whatever route took it here.
 */
static __always_inline int encryption_strict_egress(struct __sk_buff *skb)
{
	struct runtime_config *cfg = get_runtime_config();
	struct endpoint_info *ep;
	struct lxc_ctx c = {};
	struct iphdr iph;

	if (!cfg || !cfg->strict_ipv4_mask || skb->protocol != pp_htons(ETH_P_IP))
		return CTX_ACT_OK;
	if (bpf_skb_load_bytes(skb, ETH_HLEN, &iph, sizeof(iph)) < 0)
		return CTX_ACT_OK;
	if ((iph.saddr & cfg->strict_ipv4_mask) != cfg->strict_ipv4_net ||
	    (iph.daddr & cfg->strict_ipv4_mask) != cfg->strict_ipv4_net)
		return CTX_ACT_OK;
	c.dst_id = resolve_identity4(iph.daddr);
	if ((cfg->encrypt_flags & ENCRYPT_F_STRICT_ALLOW_REMOTE_NODE) && identity_is_node(c.dst_id))
		return CTX_ACT_OK;

	c.dir = METRIC_DIR_EGRESS;
	c.ifindex = skb->ifindex;
	parse_ipv4(skb, &c.p);	/* ports for the event; the addresses are known */
	c.p.saddr = iph.saddr;
	c.p.daddr = iph.daddr;
	c.p.len = skb->len;
	ep = lookup_ip4_endpoint(iph.saddr);
	if (ep)
		c.ep_id = ep->lxc_id;
	c.src_id = resolve_identity4(iph.saddr);
	return send_drop_notify(&c, DROP_UNENCRYPTED_TRAFFIC, POLICY_MATCH_NONE);
}

int cil_to_netdev(struct __sk_buff *skb)
{
	int ret = host_firewall4(skb, 1);

	if (ret != CTX_ACT_OK)
		return ret;
	return encryption_strict_egress(skb);
}
