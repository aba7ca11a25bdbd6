/* SPDX-License-Identifier: Apache-2.0 */
/*
 * bpf_host.c - the program on the node's underlay interface (eth0):
 *
 *   cil_from_netdev  tc INGRESS of the node's netdev: NodePort, externalIPs
 *                    and LoadBalancer IPs (lib/nodeport.h), and the replies
 *                    of NodePort flows SNATed to a backend on another node.
 *
 * Compiled in the same unit as bpf_lxc.c (the loader appends it), so both
 * share one set of pinned maps and one compile per node.
 */
#include "lib/common.h"
#include "lib/maps.h"
#include "lib/lb.h"
#include "lib/nodeport.h"

int cil_from_netdev(struct __sk_buff *skb)
{
	return nodeport_lb4(skb);
}
