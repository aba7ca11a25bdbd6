/* SPDX-License-Identifier: Apache-2.0 */
/*
 * drop.h - drop reason codes, with Cilium's numbers and names.
 *
 * Why Cilium's: Hubble's drop_reason_desc enum and `cilium monitor` texts
 * use them, so flows and metrics read the same as on a Cilium cluster.
 * Python mirror: libs/propolis/datapath/drop.py (a test parses this header
 * and compares, so the two cannot drift). Format of each line the test
 * reads:  #define DROP_X <code>  / * "<Cilium text>" HUBBLE_ENUM_NAME * /
 */
#ifndef __PROPOLIS_DROP_H_
#define __PROPOLIS_DROP_H_

#define DROP_INVALID_SIP	132	/* "Invalid source ip" INVALID_SOURCE_IP */
#define DROP_POLICY		133	/* "Policy denied" POLICY_DENIED */
#define DROP_INVALID		134	/* "Invalid packet" INVALID_PACKET_DROPPED */
#define DROP_CT_INVALID_HDR	135	/* "CT: Truncated or invalid header" CT_TRUNCATED_OR_INVALID_HEADER */
#define DROP_FRAG_NEEDED	136	/* "Fragmentation needed" FRAGMENTATION_NEEDED */
#define DROP_CT_UNKNOWN_PROTO	137	/* "CT: Unknown L4 protocol" CT_UNKNOWN_L4_PROTOCOL */
#define DROP_UNKNOWN_L3		139	/* "Unsupported L3 protocol" UNSUPPORTED_L3_PROTOCOL */
#define DROP_UNKNOWN_L4		142	/* "Unknown L4 protocol" UNKNOWN_L4_PROTOCOL */
#define DROP_UNKNOWN_TARGET	150	/* "Unknown L3 target address" UNKNOWN_L3_TARGET_ADDRESS */
#define DROP_UNROUTABLE		151	/* "Stale or unroutable IP" STALE_OR_UNROUTABLE_IP */
#define DROP_NO_LXC		152	/* "No matching local container found" NO_MATCHING_LOCAL_CONTAINER_FOUND */
#define DROP_CT_CREATE_FAILED	155	/* "CT: Map insertion failed" CT_MAP_INSERTION_FAILED */
#define DROP_FRAG_NOSUPPORT	157	/* "IP fragmentation not supported" IP_FRAGMENTATION_NOT_SUPPORTED */
#define DROP_NO_SERVICE		158	/* "Service backend not found" SERVICE_BACKEND_NOT_FOUND */
#define DROP_UNKNOWN_CT		163	/* "Unknown connection tracking state" UNKNOWN_CONNECTION_TRACKING_STATE */
#define DROP_NO_CONFIG		165	/* "No configuration available to perform policy decision" NO_CONFIGURATION_AVAILABLE_TO_PERFORM_POLICY_DECISION */
#define DROP_NAT_NO_MAPPING	167	/* "No mapping for NAT masquerade" NO_MAPPING_FOR_NAT_MASQUERADE */
#define DROP_FIB_LOOKUP		169	/* "FIB lookup failed" FIB_LOOKUP_FAILED */
#define DROP_INVALID_IDENTITY	171	/* "Invalid identity" INVALID_IDENTITY */
#define DROP_UNKNOWN_SENDER	172	/* "Unknown sender" UNKNOWN_SENDER */
#define DROP_FRAG_NOT_FOUND	175	/* "First logical datagram fragment not found" FIRST_LOGICAL_DATAGRAM_FRAGMENT_NOT_FOUND */
#define DROP_PROXY_LOOKUP_FAILED	178	/* "Failed to retrieve socket" SOCKET_LOOKUP_FAILED */
#define DROP_PROXY_SET_FAILED	179	/* "Failed to assign socket" SOCKET_ASSIGN_FAILED */
#define DROP_PROXY_UNSUPP_PROTO	180	/* "Proxy redirection not supported for protocol" PROXY_REDIRECTION_NOT_SUPPORTED_FOR_PROTOCOL */
#define DROP_POLICY_DENY	181	/* "Policy denied by denylist" POLICY_DENY */
#define DROP_UNENCRYPTED_TRAFFIC	195	/* "Traffic is unencrypted" UNENCRYPTED_TRAFFIC */
#define DROP_EP_NOT_READY	203	/* "Endpoint policy program not available" DROP_EP_NOT_READY */

#endif /* __PROPOLIS_DROP_H_ */
