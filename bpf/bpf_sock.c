/* SPDX-License-Identifier: Apache-2.0 */
/*
 * bpf_sock.c - socket-level load-balancing (Cilium's socketLB, bpf_sock.c),
 * attached by the datapath-writer to the node's cgroup (v2) only:
 *
 *   cil_sock4_connect      cgroup/connect4: TCP connect() and UDP connect()
 *                          to a Service frontend go to one of its backends.
 *   cil_sock4_sendmsg      cgroup/sendmsg4: the same per unconnected UDP
 *                          datagram (sendto/sendmsg with an address).
 *   cil_sock4_recvmsg      cgroup/recvmsg4: a UDP reply from that backend is
 *                          reported as coming from the frontend.
 *   cil_sock4_getpeername  cgroup/getpeername4: the same for getpeername().
 *
 * Only sockets of the node's own network namespace are translated
 * (socketLB.hostNamespaceOnly, lib/sock.h); everything else proceeds
 * untouched. Compiled in the same unit as bpf_lxc.c (the loader appends it).
 */
#include "lib/common.h"
#include "lib/maps.h"
#include "lib/lb.h"
#include "lib/sock.h"

static __always_inline int sock4_verdict(int ret)
{
	if (ret < 0) {
		bpf_set_retval(ret);
		return SYS_REJECT;
	}
	return SYS_PROCEED;
}

int cil_sock4_connect(struct bpf_sock_addr *ctx)
{
	return sock4_verdict(sock4_xlate_fwd(ctx));
}

int cil_sock4_sendmsg(struct bpf_sock_addr *ctx)
{
	return sock4_verdict(sock4_xlate_fwd(ctx));
}

int cil_sock4_recvmsg(struct bpf_sock_addr *ctx)
{
	sock4_xlate_rev(ctx);
	return SYS_PROCEED;
}

int cil_sock4_getpeername(struct bpf_sock_addr *ctx)
{
	sock4_xlate_rev(ctx);
	return SYS_PROCEED;
}
