/* SPDX-License-Identifier: Apache-2.0 */
/*
 * common.h - constants shared by every Propolis BPF program.
 *
 * Why: one place for identities, directions, verdicts and the per-node
 * compile-time settings, so bpf_lxc.c and every lib/ header agree.
 * Numbers follow Cilium (bpf/lib/common.h, pkg/identity) where the concept
 * is the same, so Hubble-shaped consumers can use them unchanged.
 *
 * The loader (libs/propolis/datapath/loader.py) compiles this once per node
 * and passes -D settings; every endpoint-specific value lives in maps.
 */
#ifndef __PROPOLIS_COMMON_H_
#define __PROPOLIS_COMMON_H_

#include <uapi/linux/bpf.h>
#include <uapi/linux/pkt_cls.h>
#include <uapi/linux/if_ether.h>
#include <uapi/linux/ip.h>
#include <uapi/linux/in.h>
#include <uapi/linux/tcp.h>
#include <uapi/linux/udp.h>
#include <uapi/linux/icmp.h>

/* ---- per-node compile-time settings (given by the loader) ---- */
#ifndef PIN_DIR
#define PIN_DIR "/sys/fs/bpf/propolis/default"
#endif
#ifndef NODE_NAME
#define NODE_NAME "default"
#endif

/* ---- reserved security identities (Cilium's numbers) ---- */
#define ID_UNKNOWN		0	/* invalid; in policy keys: any identity */
#define ID_HOST			1
#define ID_WORLD		2
#define ID_UNMANAGED		3
#define ID_HEALTH		4
#define ID_INIT			5
#define ID_REMOTE_NODE		6
#define ID_KUBE_APISERVER	7
#define ID_INGRESS		8
#define ID_WORLD_IPV4		9
#define ID_WORLD_IPV6		10

/* ---- traffic direction as Cilium's metrics/events encode it ---- */
#define METRIC_DIR_UNKNOWN	0
#define METRIC_DIR_INGRESS	1	/* packet entering the pod (cil_to_container) */
#define METRIC_DIR_EGRESS	2	/* packet leaving the pod (cil_from_container) */
#define METRIC_DIR_SERVICE	3

/* ---- policy key direction bit (policy_key.egress) ---- */
#define POLICY_INGRESS		0
#define POLICY_EGRESS		1

/* ---- address families in map keys (room for IPv6 later) ---- */
#define ENDPOINT_KEY_IPV4	1
#define ENDPOINT_KEY_IPV6	2

/* ---- endpoint flags (endpoint_info.flags) ---- */
#define ENDPOINT_F_HOST			(1 << 0)	/* Cilium: the host endpoint */
#define ENDPOINT_F_INGRESS_ENFORCED	(1 << 8)	/* some policy selects it for ingress (or mode=always) */
#define ENDPOINT_F_EGRESS_ENFORCED	(1 << 9)	/* some policy selects it for egress (or mode=always) */
#define ENDPOINT_F_POLICY_AUDIT		(1 << 10)	/* policy audit mode: would-be drops reported as AUDIT, forwarded */

/* ---- verdict codes returned by the helpers (0 = pass, <0 = -drop reason) ---- */
#define CTX_ACT_OK	TC_ACT_OK
#define CTX_ACT_DROP	TC_ACT_SHOT

/* time in seconds since boot, as the conntrack lifetimes are counted (Cilium: bpf_mono_now) */
static __always_inline __u32 bpf_mono_now(void)
{
	return (__u32)(bpf_ktime_get_ns() / 1000000000ULL);
}

#endif /* __PROPOLIS_COMMON_H_ */
