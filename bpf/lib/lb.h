/* SPDX-License-Identifier: Apache-2.0 */
/*
 * lb.h - service load-balancing (kube-proxy replacement): RESERVED for
 * issue 6. Nothing here is compiled into a map yet.
 *
 * Where it plugs in: cil_from_container calls the service lookup right
 * after the endpoint lookup and before conntrack (see "SERVICE LB HOOK"
 * in bpf_lxc.c): lookup cilium_lb4_services_v2 {VIP, dport, proto, scope,
 * backend_slot 0}, pick a backend slot (random or Maglev), read
 * cilium_lb4_backends_v3[backend_id], DNAT, create a CT_SERVICE entry
 * carrying rev_nat_index (ct_entry.rev_nat_index exists already) and
 * reverse-NAT replies from cilium_lb4_reverse_nat in cil_to_container.
 * The policy decision then sees the backend address (as Cilium does).
 *
 * Layouts below follow Cilium's (bpf/lib/common.h lb4_*), so issue 6 can
 * declare the pinned maps in maps.h with them unchanged.
 */
#ifndef __PROPOLIS_LB_H_
#define __PROPOLIS_LB_H_

#include "lib/common.h"

struct lb4_key {
	__be32 address;		/* service VIP */
	__be16 dport;		/* L4 port, network order */
	__u16 backend_slot;	/* 0 = master entry, 1..count = backends */
	__u8 proto;		/* L4 protocol, 0 = any */
	__u8 scope;		/* 0 external, 1 internal (traffic policy Local) */
	__u8 pad[2];
};

struct lb4_service {
	__u32 backend_id;	/* slot > 0: backend; slot 0: affinity timeout */
	__u16 count;		/* slot 0: number of backends */
	__u16 rev_nat_index;
	__u8 flags;
	__u8 flags2;
	__u8 pad[2];
};

struct lb4_backend {
	__be32 address;
	__be16 port;
	__u8 proto;
	__u8 flags;		/* backend state: active, terminating, ... */
	__u16 cluster_id;
	__u8 zone;
	__u8 pad;
};

struct lb4_reverse_nat {
	__be32 address;
	__be16 port;
	__u16 pad;
};

#endif /* __PROPOLIS_LB_H_ */
