/* SPDX-License-Identifier: Apache-2.0 */
/*
 * sock.h - socket-level load-balancing (Cilium's socketLB): the maps and the
 * translation bpf_sock.c's cgroup programs share. Mirrored by
 * libs/propolis/maps/sock.py (checked by test_layouts).
 *
 *   cilium_lb4_reverse_sk   {socket cookie, backend address, port} ->
 *                           {frontend address, port, rev_nat_index}: what a
 *                           UDP reply (recvmsg4) or getpeername4 reports
 *                           instead of the backend (Cilium's layout).
 *   cilium_lb_sock_config   ARRAY[1], Propolis: the node's network namespace
 *                           cookie, written by the datapath-writer. Only
 *                           sockets of that namespace are translated
 *                           (socketLB.hostNamespaceOnly: pods' sockets are
 *                           left to the per-packet path); 0 = translate none.
 *
 * Why a socket-level path at all: a hostNetwork process's packets to a
 * ClusterIP never cross a pod veth or the netdev's ingress, so the per-packet
 * programs never see them. Translating at connect()/sendmsg() picks the
 * backend once per connection (once per socket for UDP), with the same maps
 * and the same selection as the per-packet path (lib/lb.h).
 */
#ifndef __PROPOLIS_SOCK_H_
#define __PROPOLIS_SOCK_H_

#include "lib/common.h"
#include "lib/maps.h"
#include "lib/lb.h"

#ifndef LB4_REVERSE_NAT_SK_MAP_SIZE
#define LB4_REVERSE_NAT_SK_MAP_SIZE 65536
#endif

/* cgroup sock_addr verdicts */
#define SYS_REJECT	0
#define SYS_PROCEED	1

#define SOCK_ECONNREFUSED	111

struct ipv4_revnat_tuple {
	__u64 cookie;		/* socket cookie */
	__be32 address;		/* backend */
	__be16 port;
	__u16 pad;
};

struct ipv4_revnat_entry {
	__be32 address;		/* frontend */
	__be16 port;
	__u16 rev_nat_index;
};

struct sock_lb_config {
	__u64 host_netns_cookie;	/* the node's network namespace; 0 = translate nothing */
	__u32 flags;			/* reserved */
	__u32 pad;
};

/* bcc 0.26 declares bpf_get_socket_cookie as returning u32: the whole cookie */
static __u64 (*sock_cookie)(void *ctx) = (void *)BPF_FUNC_get_socket_cookie;

BPF_TABLE_PINNED("lru_hash", struct ipv4_revnat_tuple, struct ipv4_revnat_entry, lb4_reverse_sk,
		 LB4_REVERSE_NAT_SK_MAP_SIZE, PIN_DIR "/cilium_lb4_reverse_sk");
BPF_TABLE_PINNED("array", __u32, struct sock_lb_config, sock_lb_config, 1, PIN_DIR "/cilium_lb_sock_config");

/* socketLB.hostNamespaceOnly: is this socket in the node's own network namespace? */
static __always_inline int sock_in_host_netns(struct bpf_sock_addr *ctx, __u64 *netns_cookie)
{
	__u32 zero = 0;
	struct sock_lb_config *cfg = sock_lb_config.lookup(&zero);

	*netns_cookie = bpf_get_netns_cookie(ctx);
	return cfg && cfg->host_netns_cookie && cfg->host_netns_cookie == *netns_cookie;
}

/* An address of this node (ipcache identity host). */
static __always_inline int sock4_is_local(__be32 address)
{
	struct ipcache_key key = {};
	struct remote_endpoint_info *info;

	key.prefixlen = IPCACHE_PREFIX_STATIC + 32;
	key.family = ENDPOINT_KEY_IPV4;
	key.addr.ip4 = address;
	info = cilium_ipcache.lookup(&key);
	return info && info->sec_identity == ID_HOST;
}

/* Cilium's sock4_skip_xlate: externalIPs and hostPorts are the node's to
 * translate only when addressed to one of its own addresses; other ones are
 * reached through the network (and the netdev's per-packet path). */
static __always_inline int sock4_skip_xlate(struct lb4_service *svc, __be32 address)
{
	if (svc->flags & (SVC_FLAG_EXTERNAL_IP | SVC_FLAG_HOSTPORT))
		return !sock4_is_local(address);
	return 0;
}

/* The number the backend is chosen by (lib/lb.h lb4_select_backend_id): TCP a
 * random one per connection (Maglev: per socket); UDP the socket cookie, so
 * every datagram of one socket goes to the same backend while the backend set
 * stays the same (Cilium's sock_select_slot). */
static __always_inline __u32 sock4_selection_hash(struct bpf_sock_addr *ctx, struct lb4_service *svc)
{
	if (ctx->protocol == IPPROTO_TCP && !(svc->flags2 & SVC_FLAG_MAGLEV))
		return bpf_get_prandom_u32();
	__u64 cookie = sock_cookie(ctx);

	return lb_mix((__u32)cookie ^ (__u32)(cookie >> 32));
}

static __always_inline __u32 sock4_backend_id(struct bpf_sock_addr *ctx, struct lb4_key *key,
					      struct lb4_service *svc, __u64 netns_cookie)
{
	struct lb4_affinity_key akey = {};
	__u32 now = bpf_mono_now(), id = 0;

	if (svc->flags & SVC_FLAG_AFFINITY) {
		/* Cilium: a socket's client is its network namespace (all of the node) */
		akey.client_ip = (__u32)netns_cookie;
		akey.client_pad = (__u32)(netns_cookie >> 32);
		akey.netns_cookie = 1;
		akey.rev_nat_id = svc->rev_nat_index;
		id = lb4_affinity_backend_by(&akey, svc, now);
	}
	if (!id)
		id = lb4_select_backend_id(key, svc, sock4_selection_hash(ctx, svc));
	if (id && (svc->flags & SVC_FLAG_AFFINITY))
		lb4_affinity_update_by(&akey, id, now);
	return id;
}

/*
 * connect4 / sendmsg4: a destination that is a Service frontend becomes one of
 * its backends, and the socket remembers the frontend for replies. Returns 0
 * (translated or not a Service for this socket) or -SOCK_ECONNREFUSED when
 * the Service has no backend (the per-packet path drops those: here the
 * caller is told at once).
 */
static __always_inline int sock4_xlate_fwd(struct bpf_sock_addr *ctx)
{
	struct ipv4_revnat_tuple rkey = {};
	struct ipv4_revnat_entry rval = {};
	struct lb4_key key = {};
	struct lb4_service *svc;
	struct lb4_backend *be;
	__u64 netns_cookie;
	__u32 id;

	if (ctx->protocol != IPPROTO_TCP && ctx->protocol != IPPROTO_UDP)
		return 0;
	if (!sock_in_host_netns(ctx, &netns_cookie))
		return 0;
	key.address = ctx->user_ip4;
	key.dport = (__be16)ctx->user_port;
	key.proto = (__u8)ctx->protocol;
	svc = lb4_services.lookup(&key);
	if (!svc || sock4_skip_xlate(svc, key.address))
		return 0;
	if (svc->count == 0)
		return -SOCK_ECONNREFUSED;
	id = sock4_backend_id(ctx, &key, svc, netns_cookie);
	be = id ? lb4_backends.lookup(&id) : 0;
	if (!be)
		return -SOCK_ECONNREFUSED;

	rkey.cookie = sock_cookie(ctx);
	rkey.address = be->address;
	rkey.port = be->port;
	rval.address = key.address;
	rval.port = key.dport;
	rval.rev_nat_index = svc->rev_nat_index;
	lb4_reverse_sk.update(&rkey, &rval);

	ctx->user_ip4 = be->address;
	ctx->user_port = (__u32)be->port;
	return 0;
}

/*
 * recvmsg4 / getpeername4: a peer that is a backend this socket was sent to
 * through a Service is reported as the Service's frontend, while that
 * frontend still exists (its reverse NAT entry says so).
 */
static __always_inline void sock4_xlate_rev(struct bpf_sock_addr *ctx)
{
	struct ipv4_revnat_tuple rkey = {};
	struct ipv4_revnat_entry *rval;
	struct lb4_reverse_nat *rn;
	__u64 netns_cookie;
	__u16 rev_nat;

	if (!sock_in_host_netns(ctx, &netns_cookie))
		return;
	rkey.cookie = sock_cookie(ctx);
	rkey.address = ctx->user_ip4;
	rkey.port = (__be16)ctx->user_port;
	rval = lb4_reverse_sk.lookup(&rkey);
	if (!rval)
		return;
	rev_nat = rval->rev_nat_index;
	rn = lb4_reverse_nat.lookup(&rev_nat);
	if (!rn || rn->address != rval->address || rn->port != rval->port) {
		lb4_reverse_sk.delete(&rkey);
		return;
	}
	ctx->user_ip4 = rval->address;
	ctx->user_port = (__u32)rval->port;
}

#endif /* __PROPOLIS_SOCK_H_ */
