/* SPDX-License-Identifier: Apache-2.0 */
/*
 * policy.h - the L3/L4 policy decision for a NEW connection.
 *
 * Each endpoint has its own LPM trie (cilium_policy_v2_<EPID>), reached
 * through cilium_ep_to_policy[endpoint id], so one endpoint's policy is
 * replaced without touching any other. Key: {peer identity, direction,
 * protocol, dport}; the prefix length makes protocol and port wildcards
 * (prefix stops before them) and port ranges (prefix-aligned blocks).
 *
 * Two lookups per decision, whatever the map size: the exact peer identity
 * and identity 0 (= any). Deny beats allow: a deny from either lookup
 * wins; within one identity the writer turns every allow entry covered by
 * a deny into a deny (libs/propolis/maps/policy.py), so the longest match
 * is always right. Between two allows the more specific (longer proto+port
 * prefix) gives the proxy port.
 */
#ifndef __PROPOLIS_POLICY_H_
#define __PROPOLIS_POLICY_H_

#include "lib/maps.h"
#include "lib/drop.h"
#include "lib/packet.h"
#include "lib/events.h"

struct policy_result {
	int verdict;		/* 0 allow, -DROP_POLICY, -DROP_POLICY_DENY, -DROP_NO_CONFIG */
	__be16 proxy_port;	/* allowed with L7 redirect (later) */
	__u8 match_type;	/* POLICY_MATCH_* */
	__u8 audited;		/* a drop let through by audit mode (reported as AUDIT) */
};

static __always_inline __u8 policy_match_type(struct policy_entry *e, int identity_specific)
{
	int any_proto = e->flags & POLICY_F_WILDCARD_PROTO;
	int any_port = e->flags & POLICY_F_WILDCARD_DPORT;

	if (identity_specific) {
		if (any_proto)
			return POLICY_MATCH_L3_ONLY;
		return any_port ? POLICY_MATCH_L3_PROTO : POLICY_MATCH_L3_L4;
	}
	if (any_proto)
		return POLICY_MATCH_ALL;
	return any_port ? POLICY_MATCH_PROTO_ONLY : POLICY_MATCH_L4_ONLY;
}

static __always_inline void policy_account(struct policy_entry *e, __u32 len)
{
	__sync_fetch_and_add(&e->packets, 1);
	__sync_fetch_and_add(&e->bytes, len);
}

static __always_inline void policy_check(struct lxc_ctx *c, __u32 peer_id, __u8 egress,
					 struct policy_result *res)
{
	struct policy_key key = {};
	struct policy_entry *exact = 0, *any = 0, *chosen;
	__u32 ep_id = c->ep_id;
	void *policy_map;

	res->proxy_port = 0;
	res->match_type = POLICY_MATCH_NONE;

	policy_map = ep_to_policy.lookup(&ep_id);
	if (!policy_map) {
		/* enforced but the writer has not given this endpoint a policy map yet: fail closed */
		res->verdict = -DROP_NO_CONFIG;
		return;
	}

	key.prefixlen = POLICY_PREFIX_FULL;
	key.egress = egress;
	key.protocol = c->p.protocol;
	key.dport = pp_htons(c->p.policy_port);
	if (peer_id != ID_UNKNOWN) {
		key.sec_label = peer_id;
		exact = bpf_map_lookup_elem(policy_map, &key);
	}
	key.sec_label = ID_UNKNOWN;
	any = bpf_map_lookup_elem(policy_map, &key);

	if (exact && (exact->flags & POLICY_F_DENY)) {
		policy_account(exact, c->p.len);
		res->match_type = policy_match_type(exact, 1);
		res->verdict = -DROP_POLICY_DENY;
		return;
	}
	if (any && (any->flags & POLICY_F_DENY)) {
		policy_account(any, c->p.len);
		res->match_type = policy_match_type(any, 0);
		res->verdict = -DROP_POLICY_DENY;
		return;
	}
	if (!exact && !any) {
		res->verdict = -DROP_POLICY;
		return;
	}
	if (exact && (!any || exact->prefix_len >= any->prefix_len)) {
		chosen = exact;
		res->match_type = policy_match_type(exact, 1);
	} else {
		chosen = any;
		res->match_type = policy_match_type(any, 0);
	}
	if (!chosen) {		/* unreachable; keeps the verifier sure */
		res->verdict = -DROP_POLICY;
		return;
	}
	policy_account(chosen, c->p.len);
	res->proxy_port = chosen->proxy_port;
	res->verdict = 0;
}

/* Policy audit mode (Cilium's policyAuditMode, per endpoint): a connection the
 * policy would drop is reported as an AUDIT policy verdict and let through, so
 * people see what a policy would do before it does it. An endpoint without a
 * policy map yet stays fail closed. Returns 1 when the drop was audited. */
static __always_inline int policy_audit(struct lxc_ctx *c, struct policy_result *res)
{
	if (!c->audit || res->verdict >= 0 || res->verdict == -DROP_NO_CONFIG)
		return 0;
	send_policy_verdict_notify(c, VERDICT_AUDIT, res->match_type, 0, (__u16)(-res->verdict));
	res->verdict = 0;
	res->proxy_port = 0;
	res->audited = 1;
	return 1;
}

#endif /* __PROPOLIS_POLICY_H_ */
