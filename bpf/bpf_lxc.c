/* SPDX-License-Identifier: Apache-2.0 */
/*
 * bpf_lxc.c - the programs on each pod's host-side veth (lxc...).
 *
 *   cil_from_container  tc INGRESS of the lxc = packets LEAVING the pod:
 *                       the pod's EGRESS policy.
 *   cil_to_container    tc EGRESS of the lxc = packets ENTERING the pod:
 *                       the pod's INGRESS policy.
 *
 * Compiled once per node (by libs/propolis/datapath/loader.py, bcc); every
 * endpoint-specific value (id, identity, enforcement, policy) is read from
 * the maps, so a new pod costs a few map writes and a tc attach.
 *
 * Per packet: parse -> find the local endpoint (bound to this interface) ->
 * identity of the peer (cilium_lxc, then cilium_ipcache, else world) ->
 * conntrack; only NEW connections meet the policy map. Every verdict is
 * counted in cilium_metrics and reported in cilium_events.
 */
#include "lib/common.h"
#include "lib/drop.h"
#include "lib/maps.h"
#include "lib/packet.h"
#include "lib/metrics.h"
#include "lib/events.h"
#include "lib/conntrack.h"
#include "lib/policy.h"
#include "lib/lb.h"
#include "lib/nodeport.h"
#include "lib/proxy.h"
#include "lib/host_firewall.h"

static __always_inline struct endpoint_info *lookup_ip4_endpoint(__be32 ip)
{
	struct endpoint_key key = {};

	key.addr.ip4 = ip;
	key.family = ENDPOINT_KEY_IPV4;
	return cilium_lxc.lookup(&key);
}

/* Security identity of an address: a local endpoint, else the longest
 * ipcache prefix, else reserved:world. */
static __always_inline __u32 resolve_identity4(__be32 ip)
{
	struct endpoint_info *ep = lookup_ip4_endpoint(ip);
	struct ipcache_key key = {};
	struct remote_endpoint_info *info;

	if (ep)
		return ep->sec_id;
	key.prefixlen = IPCACHE_PREFIX_STATIC + 32;
	key.family = ENDPOINT_KEY_IPV4;
	key.addr.ip4 = ip;
	info = cilium_ipcache.lookup(&key);
	if (info && info->sec_identity != ID_UNKNOWN)
		return info->sec_identity;
	return ID_WORLD;
}

/*
 * The shared body of both programs; `egress` says which side we are.
 * side_ct: which conntrack side this program creates (CT_EGRESS/CT_INGRESS).
 */
static __always_inline int handle_ipv4(struct __sk_buff *skb, int egress)
{
	struct lxc_ctx c = {};
	struct endpoint_info *ep;
	struct ct_entry *entry;
	struct policy_result pol = {};
	struct lb4_flow svc_flow = {};	/* a new service flow, remembered once allowed */
	enum ct_status status;
	__u8 side = egress ? CT_EGRESS : CT_INGRESS;
	__u8 new_flags = 0;
	__u16 redirect_port;
	int ret, to_proxy;

	c.dir = egress ? METRIC_DIR_EGRESS : METRIC_DIR_INGRESS;
	c.ifindex = skb->ifindex;
	c.p.len = skb->len;

	ret = parse_ipv4(skb, &c.p);
	if (ret < 0)
		return send_drop_notify(&c, -ret, POLICY_MATCH_NONE);

	/* re-injected by cil_to_container for a local proxy (lib/proxy.h) */
	redirect_port = proxy_to_proxy_port(skb, &to_proxy);
	if (egress && to_proxy) {
		ret = proxy_deliver(skb, &c.p, redirect_port);
		return ret < 0 ? send_drop_notify(&c, -ret, POLICY_MATCH_NONE) : ret;
	}

	/* The local endpoint must own this interface: a pod cannot send with
	 * another address (anti-spoofing), nor receive another pod's packets. */
	ep = lookup_ip4_endpoint(egress ? c.p.saddr : c.p.daddr);
	if (!ep || ep->ifindex != skb->ifindex)
		return send_drop_notify(&c, egress ? DROP_INVALID_SIP : DROP_UNKNOWN_TARGET,
					POLICY_MATCH_NONE);
	c.ep_id = ep->lxc_id;
	if (egress) {
		c.src_id = ep->sec_id;
		c.dst_id = resolve_identity4(c.p.daddr);
		c.enforced = (ep->flags & ENDPOINT_F_EGRESS_ENFORCED) != 0;
	} else {
		c.src_id = resolve_identity4(c.p.saddr);
		c.dst_id = ep->sec_id;
		c.enforced = (ep->flags & ENDPOINT_F_INGRESS_ENFORCED) != 0;
	}
	c.audit = (ep->flags & ENDPOINT_F_POLICY_AUDIT) != 0;

	/* Service load-balancing (lib/lb.h): DNAT before conntrack, so the
	 * connection is tracked and the policy decided on the backend. */
	if (egress) {
		int hairpin = 0;

		if (lb4_hairpin_reply(skb, &c.p)) {
			send_trace_notify(&c, TRACE_TO_STACK, TRACE_REASON_REPLY, c.p.tcp_flags, 1);
			return CTX_ACT_OK;
		}
		ret = lb4_local(skb, &c.p, &c.rev_nat, &hairpin, &svc_flow);
		if (ret < 0)
			return send_drop_notify(&c, -ret, POLICY_MATCH_NONE);
		if (c.rev_nat)
			c.dst_id = resolve_identity4(c.p.daddr);
	} else if ((skb->mark & MARK_MAGIC_MASK) == MARK_MAGIC_HAIRPIN &&
		   skb->ingress_ifindex == skb->ifindex) {
		/* a pod reaching itself through a service: tracked by
		 * cil_from_container. Trusted only when the packet came in from
		 * this very veth: a host process can set any mark (SO_MARK), but
		 * its packets are not forwarded from an interface; a pod's mark
		 * is scrubbed when it leaves its namespace. */
		skb->mark = 0;
		send_trace_notify(&c, TRACE_TO_LXC, TRACE_REASON_ESTABLISHED, c.p.tcp_flags, 0);
		return CTX_ACT_OK;
	} else if ((skb->mark & MARK_MAGIC_MASK) == MARK_MAGIC_NODEPORT && skb->ingress_ifindex) {
		/* DNATed by cil_from_netdev: the reply must get the NodePort frontend back */
		c.rev_nat = (__u16)(skb->mark & 0xffff);
		skb->mark = 0;
	}

	if (ct_is_related4(&c.p, side)) {
		/* an error about a service flow names the backend: give the
		 * client its frontend back (RFC 5508, lib/lb.h) */
		ret = lb4_icmp_err_rev_nat(skb, &c.p, side);
		if (ret < 0)
			return send_drop_notify(&c, -ret, POLICY_MATCH_NONE);
		if (ret && egress) {
			/* a NodePort backend's error: its source is now the node's */
			ret = nodeport_redirect(skb, &c);
			if (ret != CTX_ACT_DROP)
				send_trace_notify(&c, TRACE_TO_STACK, TRACE_REASON_RELATED, 0, 1);
			return ret;
		}
		send_trace_notify(&c, egress ? TRACE_TO_STACK : TRACE_TO_LXC, TRACE_REASON_RELATED, 0, 1);
		return CTX_ACT_OK;
	}

	/* an error from a router in between (fragmentation needed on the path
	 * to a backend) meets conntrack and policy as it is; if it passes, the
	 * client's socket must see the frontend in it */
	if (!egress && c.p.has_inner) {
		ret = lb4_icmp_err_rev_nat(skb, &c.p, CT_INGRESS);
		if (ret < 0)
			return send_drop_notify(&c, -ret, POLICY_MATCH_NONE);
	}

	status = ct_lookup4(&c.p, side, &new_flags, &entry);
	if (status == CT_ESTABLISHED || status == CT_REPLY) {
		if (proxy_tracked(skb, &c.p, egress, status, entry, &ret)) {
			if (ret < 0)
				return send_drop_notify(&c, -ret, POLICY_MATCH_NONE);
			send_trace_notify(&c, TRACE_TO_PROXY, TRACE_REASON_ESTABLISHED, new_flags,
					  status == CT_REPLY);
			return ret;
		}
		if (status == CT_REPLY && entry && entry->rev_nat_index) {
			/* reverse NAT: the client sees the service frontend reply */
			ret = lb4_rev_nat(skb, &c.p, entry->rev_nat_index);
			if (ret < 0)
				return send_drop_notify(&c, -ret, POLICY_MATCH_NONE);
			if (egress) {
				/* a NodePort reply from a local backend: its source is now
				 * the node's address, which the stack would take for a
				 * martian; route it ourselves (lib/nodeport.h), and
				 * trace it only once it is on its way */
				ret = nodeport_redirect(skb, &c);
				if (ret != CTX_ACT_DROP)
					send_trace_notify(&c, TRACE_TO_STACK, TRACE_REASON_REPLY, new_flags, 1);
				return ret;
			}
		}
		lb4_commit_flow(&svc_flow);
		send_trace_notify(&c, egress ? TRACE_TO_STACK : TRACE_TO_LXC,
				  status == CT_REPLY ? TRACE_REASON_REPLY : TRACE_REASON_ESTABLISHED,
				  new_flags, status == CT_REPLY);
		return CTX_ACT_OK;
	}

	/* a reply to a proxy's onward connection to a remote server (lib/proxy.h) */
	if (!egress && proxy_owns_tuple(skb, &c.p)) {
		ret = proxy_reinject(skb, &c.p, 0);
		return ret < 0 ? send_drop_notify(&c, -ret, POLICY_MATCH_NONE) : ret;
	}

	/* CT_NEW or CT_REOPENED: the one policy decision of the connection */
	if (c.enforced) {
		policy_check(&c, egress ? c.dst_id : c.src_id,
			     egress ? POLICY_EGRESS : POLICY_INGRESS, &pol);
		if (pol.verdict < 0 && !policy_audit(&c, &pol)) {
			/* a denied connection holds no conntrack room: its service
			 * entry is never written (ClusterIP) or forgotten (NodePort) */
			if (!egress && c.rev_nat)
				lb4_forget_flow(&c.p, c.rev_nat);
			send_policy_verdict_notify(&c, VERDICT_DROPPED, pol.match_type, 0,
						   (__u16)(-pol.verdict));
			return send_drop_notify(&c, (__u8)(-pol.verdict), pol.match_type);
		}
	}

	/* a new connection between this pod and its node meets the host firewall too (lib/host_firewall.h) */
	if (host_policy_with_pod(&c, egress) < 0)
		return CTX_ACT_DROP;

	/* the verdict is reported once it happened: a connection whose entry
	 * cannot be created is dropped, not forwarded */
	/* an ingress proxy's own onward connection is not redirected again */
	if (!egress && proxy_upstream_of(skb) == PROXY_UPSTREAM_INGRESS)
		pol.proxy_port = 0;
	ret = ct_create4(&c, side, pol.proxy_port);
	if (ret < 0) {
		if (c.enforced)
			send_policy_verdict_notify(&c, VERDICT_DROPPED, pol.match_type, 0, (__u16)(-ret));
		return send_drop_notify(&c, -ret, pol.match_type);
	}
	if (!egress && proxy_upstream_of(skb))
		proxy_flag_upstream(&c.p, side);
	if (c.enforced && !pol.audited)
		send_policy_verdict_notify(&c, pol.proxy_port ? VERDICT_REDIRECTED : VERDICT_FORWARDED,
					   pol.match_type, pol.proxy_port, 0);
	if (pol.proxy_port) {
		/* L7 redirect (lib/proxy.h): no proxy socket = dropped, never forwarded */
		ret = proxy_redirect(skb, &c.p, egress, pp_ntohs(pol.proxy_port));
		if (ret < 0)
			return send_drop_notify(&c, -ret, pol.match_type);
		send_trace_notify(&c, TRACE_TO_PROXY, TRACE_REASON_NEW, c.p.tcp_flags, 0);
		return ret;
	}
	lb4_commit_flow(&svc_flow);

	/* BANDWIDTH HOOK (later): EDT rate limiting per endpoint (cilium_throttle) on egress. */
	send_trace_notify(&c, egress ? TRACE_TO_STACK : TRACE_TO_LXC,
			  status == CT_REOPENED ? TRACE_REASON_REOPENED : TRACE_REASON_NEW,
			  c.p.tcp_flags, 0);
	return CTX_ACT_OK;
}

static __always_inline int handle_l3(struct __sk_buff *skb, int egress)
{
	struct lxc_ctx c = {};

	if (skb->protocol == pp_htons(ETH_P_IP))
		return handle_ipv4(skb, egress);
	if (skb->protocol == pp_htons(ETH_P_ARP))
		return CTX_ACT_OK;
	/* IPv6 and anything else: not supported yet, fail closed */
	c.dir = egress ? METRIC_DIR_EGRESS : METRIC_DIR_INGRESS;
	c.ifindex = skb->ifindex;
	c.p.len = skb->len;
	return send_drop_notify(&c, DROP_UNKNOWN_L3, POLICY_MATCH_NONE);
}

/* tc ingress of the lxc: packets leaving the pod (egress policy) */
int cil_from_container(struct __sk_buff *skb)
{
	return handle_l3(skb, 1);
}

/* tc egress of the lxc: packets entering the pod (ingress policy) */
int cil_to_container(struct __sk_buff *skb)
{
	return handle_l3(skb, 0);
}
