/* SPDX-License-Identifier: Apache-2.0 */
/*
 * packet.h - parse an IPv4 packet into the fields policy and conntrack need.
 *
 * Why bpf_skb_load_bytes and not direct access: the programs read a few
 * fixed-size headers once; the helper keeps the verifier happy without
 * bounds-check gymnastics and costs little at this size.
 */
#ifndef __PROPOLIS_PACKET_H_
#define __PROPOLIS_PACKET_H_

#include "lib/common.h"
#include "lib/drop.h"
#include "lib/maps.h"

#if __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
#define pp_htons(x) ((__be16)__builtin_bswap16((__u16)(x)))
#define pp_ntohs(x) ((__u16)__builtin_bswap16((__u16)(x)))
#define pp_htonl(x) ((__be32)__builtin_bswap32((__u32)(x)))
#else
#define pp_htons(x) ((__be16)(x))
#define pp_ntohs(x) ((__u16)(x))
#define pp_htonl(x) ((__be32)(x))
#endif

#define TCP_FLAG_FIN 0x01
#define TCP_FLAG_SYN 0x02
#define TCP_FLAG_RST 0x04
#define TCP_FLAG_PSH 0x08
#define TCP_FLAG_ACK 0x10

#define IPPROTO_SCTP_ 132
#define ICMP_ECHOREPLY_ 0
#define ICMP_ECHO_ 8

/* An ICMP type in the policy key's dport: bit 8 set, so type 0 (EchoReply) is a
 * type and never port 0 = "any" (Cilium stores the bare type and a rule for
 * EchoReply matches every ICMP type). Mirror: propolis.policy.entries.icmp_type_port. */
#define ICMP_TYPE_POLICY_PORT(type) ((__u16)(0x100 | (type)))

/* One IPv4 packet as the datapath sees it. */
struct pkt4 {
	__be32 saddr;
	__be32 daddr;
	__be16 sport;		/* CT tuple ports (ICMP echo: the identifier) */
	__be16 dport;
	__u16 policy_port;	/* host order; TCP/UDP/SCTP: dport, ICMP: ICMP_TYPE_POLICY_PORT(type) */
	__u8 protocol;
	__u8 tcp_flags;
	__u8 icmp_type;
	__u8 icmp_code;
	__u8 has_inner;		/* ICMP error carrying the packet it is about */
	__u8 inner_protocol;
	__u8 no_l4;		/* a non-first fragment: no L4 header, ports from the first */
	__u8 pad0[3];
	__u32 len;
	__be32 inner_saddr;	/* the offending packet as it was sent */
	__be32 inner_daddr;
	__be16 inner_sport;
	__be16 inner_dport;
};

/* Everything one program run knows about the packet and its endpoint. */
struct lxc_ctx {
	struct pkt4 p;
	__u32 ifindex;		/* lxc interface the program runs on */
	__u32 src_id;		/* security identity of the source */
	__u32 dst_id;		/* security identity of the destination */
	__u16 ep_id;		/* local endpoint id (0 = not known yet) */
	__u8 dir;		/* METRIC_DIR_INGRESS / _EGRESS */
	__u8 enforced;		/* policy enforced for this direction */
	__u16 rev_nat;		/* service frontend of a translated flow (0 = none) */
	__u8 audit;		/* policy audit mode: report would-be policy drops, forward them */
};

/* An ICMP error quotes the IP header and 8 bytes of the packet it is about:
 * enough for conntrack to find the connection (RELATED). Best effort. */
static __always_inline void parse_icmp_inner(struct __sk_buff *skb, __u32 off, struct pkt4 *p)
{
	struct iphdr inner;
	__u8 l4[8];

	if (bpf_skb_load_bytes(skb, off, &inner, sizeof(inner)) < 0 || inner.ihl < 5)
		return;
	if (bpf_skb_load_bytes(skb, off + ((__u32)inner.ihl) * 4, l4, sizeof(l4)) < 0)
		return;
	p->inner_saddr = inner.saddr;
	p->inner_daddr = inner.daddr;
	p->inner_protocol = inner.protocol;
	if (inner.protocol == IPPROTO_ICMP) {
		/* the quoted packet was an echo request: (id, 0), as parse_ipv4 keys it */
		__builtin_memcpy(&p->inner_sport, &l4[4], 2);
		p->inner_dport = 0;
	} else {
		__builtin_memcpy(&p->inner_sport, &l4[0], 2);
		__builtin_memcpy(&p->inner_dport, &l4[2], 2);
	}
	p->has_inner = 1;
}

/* Fragments (Cilium's ipv4_handle_fragmentation): the first fragment carries
 * the L4 header; its ports (and policy port) are remembered under the
 * datagram's id in cilium_ipv4_frag_datagrams, so every later fragment meets
 * conntrack and policy as the same flow. A non-first fragment whose first was
 * never seen cannot be judged: dropped (FRAG_NOT_FOUND). Returns 1 when the
 * packet is a non-first fragment whose ports were filled in, 0 otherwise. */
static __always_inline int ipv4_frag_ports(struct iphdr *iph, struct pkt4 *p, int first_done)
{
	struct ipv4_frag_id id = {};
	struct ipv4_frag_l4ports ports = {}, *found;

	id.daddr = iph->daddr;
	id.saddr = iph->saddr;
	id.id = iph->id;
	id.proto = iph->protocol;
	if (first_done) {
		ports.sport = p->sport;
		ports.dport = p->dport;
		ports.policy_port = p->policy_port;
		frag4_datagrams.update(&id, &ports);
		return 0;
	}
	found = frag4_datagrams.lookup(&id);
	if (!found)
		return -DROP_FRAG_NOT_FOUND;
	p->sport = found->sport;
	p->dport = found->dport;
	p->policy_port = found->policy_port;
	p->no_l4 = 1;
	return 1;
}

/* 0 on success, -DROP_* when the packet cannot be handled. */
static __always_inline int parse_ipv4(struct __sk_buff *skb, struct pkt4 *p)
{
	struct iphdr iph;
	__u32 l4_off;
	__u16 frag;
	int ret;

	if (bpf_skb_load_bytes(skb, ETH_HLEN, &iph, sizeof(iph)) < 0)
		return -DROP_INVALID;
	if (iph.ihl < 5 || iph.version != 4)
		return -DROP_INVALID;

	p->saddr = iph.saddr;
	p->daddr = iph.daddr;
	p->protocol = iph.protocol;
	p->len = skb->len;
	l4_off = ETH_HLEN + ((__u32)iph.ihl) * 4;

	/* MF set or a non-zero offset: a fragment */
	frag = iph.frag_off & pp_htons(0x3fff);
	if (frag & pp_htons(0x1fff)) {
		ret = ipv4_frag_ports(&iph, p, 0);
		return ret < 0 ? ret : 0;
	}

	switch (iph.protocol) {
	case IPPROTO_TCP: {
		__u8 tcp[14];

		if (bpf_skb_load_bytes(skb, l4_off, tcp, sizeof(tcp)) < 0)
			return -DROP_CT_INVALID_HDR;
		__builtin_memcpy(&p->sport, &tcp[0], 2);
		__builtin_memcpy(&p->dport, &tcp[2], 2);
		p->tcp_flags = tcp[13];
		p->policy_port = pp_ntohs(p->dport);
		break;
	}
	case IPPROTO_UDP:
	case IPPROTO_SCTP_: {
		__be16 ports[2];

		if (bpf_skb_load_bytes(skb, l4_off, ports, sizeof(ports)) < 0)
			return -DROP_CT_INVALID_HDR;
		p->sport = ports[0];
		p->dport = ports[1];
		p->policy_port = pp_ntohs(p->dport);
		break;
	}
	case IPPROTO_ICMP: {
		__u8 icmp[8];

		if (bpf_skb_load_bytes(skb, l4_off, icmp, sizeof(icmp)) < 0)
			return -DROP_CT_INVALID_HDR;
		p->icmp_type = icmp[0];
		p->icmp_code = icmp[1];
		p->policy_port = ICMP_TYPE_POLICY_PORT(icmp[0]);
		/* Echo request/reply share a tuple through the identifier:
		 * request (id, 0), reply (0, id), so the reply is the reverse. */
		if (icmp[0] == ICMP_ECHO_)
			__builtin_memcpy(&p->sport, &icmp[4], 2);
		else if (icmp[0] == ICMP_ECHOREPLY_)
			__builtin_memcpy(&p->dport, &icmp[4], 2);
		else if (icmp[0] == ICMP_DEST_UNREACH || icmp[0] == ICMP_TIME_EXCEEDED ||
			 icmp[0] == ICMP_PARAMETERPROB)
			parse_icmp_inner(skb, l4_off + 8, p);
		break;
	}
	default:
		/* other protocols: ports 0, policy can still match protocol or "any" */
		break;
	}
	if (frag)	/* the first fragment of a datagram (MF set, offset 0) */
		ipv4_frag_ports(&iph, p, 1);
	return 0;
}

#endif /* __PROPOLIS_PACKET_H_ */
