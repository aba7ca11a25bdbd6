/* SPDX-License-Identifier: Apache-2.0 */
/*
 * events.h - drop, policy-verdict and trace notifications into the
 * cilium_events ring buffer (struct flow_event in maps.h).
 *
 * Why a ring buffer: one ordered stream for all CPUs, read with epoll from
 * the observer. A full buffer never blocks a packet: the event is counted
 * in cilium_events_lost_by_type (per CPU) and the observer reports the loss
 * (Hubble's lost events). Per-node switches live in cilium_runtime_config.
 */
#ifndef __PROPOLIS_EVENTS_H_
#define __PROPOLIS_EVENTS_H_

#include "lib/maps.h"
#include "lib/drop.h"
#include "lib/packet.h"
#include "lib/metrics.h"

static __always_inline struct runtime_config *get_runtime_config(void)
{
	__u32 zero = 0;

	return runtime_config.lookup(&zero);
}

/* The node's runtime config when events of this kind are on, else NULL
 * (no config at all: every kind on, no rate limit). */
static __always_inline int events_enabled(struct runtime_config *cfg, __u32 disable_bit)
{
	return !cfg || !(cfg->events_disabled & disable_bit);
}

/* An event that did not make it into the ring, counted by type and cause
 * (readers sum ring_full over the types for Hubble's lost events). */
static __always_inline void count_lost_event(__u8 type, int rate_limited)
{
	__u32 index = type;
	struct events_lost_count *by_type = events_lost_typ.lookup(&index);

	if (!by_type)
		return;
	if (rate_limited)
		by_type->rate_limited += 1;
	else
		by_type->ring_full += 1;
}

#define EVENTS_CREDIT_PER_TOKEN	1000000000ULL	/* credit is rate * ns */
#define EVENTS_MAX_REFILL_NS	10000000000ULL	/* 10 s: no overflow, the bucket is full by then */

/* Token bucket of the event's endpoint (Cilium's bpf.events.default.rateLimit /
 * burstLimit, per endpoint here). Not atomic across CPUs: a few events more
 * or less under contention, never a lock on the packet path. 1 = emit. */
static __always_inline int events_rate_allowed(struct lxc_ctx *c, struct runtime_config *cfg)
{
	struct events_rate_bucket *b, fresh = {};
	__u32 key = c->ep_id;
	__u64 now, elapsed, credit, cap;

	if (!cfg || !cfg->events_rate_limit)
		return 1;
	cap = (__u64)(cfg->events_burst_limit ? cfg->events_burst_limit : cfg->events_rate_limit) *
	      EVENTS_CREDIT_PER_TOKEN;
	now = bpf_ktime_get_ns();
	b = events_ratelim.lookup(&key);
	if (!b) {
		fresh.last_ns = now;
		fresh.credit = cap - EVENTS_CREDIT_PER_TOKEN;
		events_ratelim.update(&key, &fresh);
		return 1;
	}
	elapsed = now - b->last_ns;
	if (elapsed > EVENTS_MAX_REFILL_NS)
		elapsed = EVENTS_MAX_REFILL_NS;
	credit = b->credit + elapsed * cfg->events_rate_limit;
	if (credit > cap)
		credit = cap;
	b->last_ns = now;
	if (credit < EVENTS_CREDIT_PER_TOKEN) {
		b->credit = credit;
		return 0;
	}
	b->credit = credit - EVENTS_CREDIT_PER_TOKEN;
	return 1;
}

static __always_inline void emit_flow_event(struct lxc_ctx *c, struct runtime_config *cfg, __u8 type, __u8 subtype,
					    __u8 verdict, __u8 match_type, __u8 trace_reason,
					    __u8 flags, __be16 proxy_port, __u16 drop_reason)
{
	struct flow_event *e;

	if (!events_rate_allowed(c, cfg)) {
		count_lost_event(type, 1);
		return;
	}
	e = cilium_events.ringbuf_reserve(sizeof(struct flow_event));
	if (!e) {
		count_lost_event(type, 0);
		return;
	}
	e->type = type;
	e->subtype = subtype;
	e->source = c->ep_id;
	e->ifindex = c->ifindex;
	e->timestamp_ns = bpf_ktime_get_ns();
	e->len_orig = c->p.len;
	e->src_identity = c->src_id;
	e->dst_identity = c->dst_id;
	e->family = ENDPOINT_KEY_IPV4;
	e->protocol = c->p.protocol;
	e->direction = c->dir;
	e->tcp_flags = c->p.tcp_flags;
	__builtin_memset(&e->saddr, 0, sizeof(e->saddr));
	__builtin_memset(&e->daddr, 0, sizeof(e->daddr));
	e->saddr.ip4 = c->p.saddr;
	e->daddr.ip4 = c->p.daddr;
	if (c->p.protocol == IPPROTO_ICMP) {
		e->sport = 0;
		e->dport = 0;
	} else {
		e->sport = c->p.sport;
		e->dport = c->p.dport;
	}
	e->verdict = verdict;
	e->match_type = match_type;
	e->trace_reason = trace_reason;
	e->flags = flags;
	e->proxy_port = proxy_port;
	e->drop_reason = drop_reason;
	e->icmp_type = c->p.icmp_type;
	e->icmp_code = c->p.icmp_code;
	e->pad = 0;
	cilium_events.ringbuf_submit(e, 0);
}

/* Count, notify and drop: every drop goes through here. */
static __always_inline int send_drop_notify(struct lxc_ctx *c, __u8 reason, __u8 match_type)
{
	struct runtime_config *cfg = get_runtime_config();

	update_metrics(c->p.len, c->dir, reason);
	if (events_enabled(cfg, EVENTS_DISABLE_DROP))
		emit_flow_event(c, cfg, CILIUM_NOTIFY_DROP, reason, VERDICT_DROPPED, match_type,
				TRACE_REASON_UNKNOWN, c->enforced ? FLOW_EVENT_F_ENFORCED : 0, 0, reason);
	return CTX_ACT_DROP;
}

static __always_inline void send_policy_verdict_notify(struct lxc_ctx *c, __u8 verdict,
						       __u8 match_type, __be16 proxy_port,
						       __u16 drop_reason)
{
	struct runtime_config *cfg = get_runtime_config();

	if (events_enabled(cfg, EVENTS_DISABLE_POLICY_VERDICT))
		emit_flow_event(c, cfg, CILIUM_NOTIFY_POLICY_VERDICT, 0, verdict, match_type,
				TRACE_REASON_NEW, FLOW_EVENT_F_ENFORCED, proxy_port, drop_reason);
}

/* Forwarded packet: counted always, traced according to monitor aggregation:
 * new, reopened and related flows always; at low/medium also the first SYN/FIN/RST of each
 * direction (new_tcp_flags); at none every packet. */
static __always_inline void send_trace_notify(struct lxc_ctx *c, __u8 obs_point, __u8 trace_reason,
					      __u8 new_tcp_flags, int is_reply)
{
	struct runtime_config *cfg = get_runtime_config();
	__u32 level = cfg ? cfg->monitor_aggregation : MONITOR_AGGREGATION_NONE;
	__u32 disabled = cfg ? cfg->events_disabled : 0;
	int report;

	update_metrics(c->p.len, c->dir, REASON_FORWARDED);
	if (disabled & EVENTS_DISABLE_TRACE)
		return;
	if (level == MONITOR_AGGREGATION_NONE || trace_reason == TRACE_REASON_NEW ||
	    trace_reason == TRACE_REASON_REOPENED || trace_reason == TRACE_REASON_RELATED)
		report = 1;
	else if (level < MONITOR_AGGREGATION_MAXIMUM)
		report = (new_tcp_flags & (TCP_FLAG_SYN | TCP_FLAG_FIN | TCP_FLAG_RST)) != 0;
	else
		report = 0;
	if (report)
		emit_flow_event(c, cfg, CILIUM_NOTIFY_TRACE, obs_point, VERDICT_FORWARDED,
				POLICY_MATCH_NONE, trace_reason,
				is_reply ? FLOW_EVENT_F_IS_REPLY : 0, 0, 0);
}

#endif /* __PROPOLIS_EVENTS_H_ */
