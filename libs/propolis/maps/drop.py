"""Drop reasons: Cilium's codes with Cilium's texts and Hubble's enum names.

Python mirror of bpf/lib/drop.h (tests/bpf/test_drop_reasons.py parses the header and
compares, so the two cannot drift). Hubble's `drop_reason_desc` and `hubble_drop_total`
use the enum names; `cilium monitor` prints the texts.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class DropReason:
    code: int
    c_name: str      # DROP_* in drop.h
    text: str        # Cilium's message ("Policy denied")
    hubble_name: str  # Hubble's DropReason enum ("POLICY_DENIED")


_REASONS = (
    DropReason(132, "DROP_INVALID_SIP", "Invalid source ip", "INVALID_SOURCE_IP"),
    DropReason(133, "DROP_POLICY", "Policy denied", "POLICY_DENIED"),
    DropReason(134, "DROP_INVALID", "Invalid packet", "INVALID_PACKET_DROPPED"),
    DropReason(135, "DROP_CT_INVALID_HDR", "CT: Truncated or invalid header", "CT_TRUNCATED_OR_INVALID_HEADER"),
    DropReason(136, "DROP_FRAG_NEEDED", "Fragmentation needed", "FRAGMENTATION_NEEDED"),
    DropReason(137, "DROP_CT_UNKNOWN_PROTO", "CT: Unknown L4 protocol", "CT_UNKNOWN_L4_PROTOCOL"),
    DropReason(139, "DROP_UNKNOWN_L3", "Unsupported L3 protocol", "UNSUPPORTED_L3_PROTOCOL"),
    DropReason(142, "DROP_UNKNOWN_L4", "Unknown L4 protocol", "UNKNOWN_L4_PROTOCOL"),
    DropReason(150, "DROP_UNKNOWN_TARGET", "Unknown L3 target address", "UNKNOWN_L3_TARGET_ADDRESS"),
    DropReason(151, "DROP_UNROUTABLE", "Stale or unroutable IP", "STALE_OR_UNROUTABLE_IP"),
    DropReason(152, "DROP_NO_LXC", "No matching local container found", "NO_MATCHING_LOCAL_CONTAINER_FOUND"),
    DropReason(155, "DROP_CT_CREATE_FAILED", "CT: Map insertion failed", "CT_MAP_INSERTION_FAILED"),
    DropReason(157, "DROP_FRAG_NOSUPPORT", "IP fragmentation not supported", "IP_FRAGMENTATION_NOT_SUPPORTED"),
    DropReason(158, "DROP_NO_SERVICE", "Service backend not found", "SERVICE_BACKEND_NOT_FOUND"),
    DropReason(163, "DROP_UNKNOWN_CT", "Unknown connection tracking state", "UNKNOWN_CONNECTION_TRACKING_STATE"),
    DropReason(165, "DROP_NO_CONFIG", "No configuration available to perform policy decision",
               "NO_CONFIGURATION_AVAILABLE_TO_PERFORM_POLICY_DECISION"),
    DropReason(167, "DROP_NAT_NO_MAPPING", "No mapping for NAT masquerade", "NO_MAPPING_FOR_NAT_MASQUERADE"),
    DropReason(169, "DROP_FIB_LOOKUP", "FIB lookup failed", "FIB_LOOKUP_FAILED"),
    DropReason(171, "DROP_INVALID_IDENTITY", "Invalid identity", "INVALID_IDENTITY"),
    DropReason(172, "DROP_UNKNOWN_SENDER", "Unknown sender", "UNKNOWN_SENDER"),
    DropReason(175, "DROP_FRAG_NOT_FOUND", "First logical datagram fragment not found",
               "FIRST_LOGICAL_DATAGRAM_FRAGMENT_NOT_FOUND"),
    DropReason(178, "DROP_PROXY_LOOKUP_FAILED", "Failed to retrieve socket", "SOCKET_LOOKUP_FAILED"),
    DropReason(179, "DROP_PROXY_SET_FAILED", "Failed to assign socket", "SOCKET_ASSIGN_FAILED"),
    DropReason(180, "DROP_PROXY_UNSUPP_PROTO", "Proxy redirection not supported for protocol",
               "PROXY_REDIRECTION_NOT_SUPPORTED_FOR_PROTOCOL"),
    DropReason(181, "DROP_POLICY_DENY", "Policy denied by denylist", "POLICY_DENY"),
    DropReason(195, "DROP_UNENCRYPTED_TRAFFIC", "Traffic is unencrypted", "UNENCRYPTED_TRAFFIC"),
    DropReason(203, "DROP_EP_NOT_READY", "Endpoint policy program not available", "DROP_EP_NOT_READY"),
)

DROP_REASONS: dict[int, DropReason] = {r.code: r for r in _REASONS}

DROP_POLICY = 133
DROP_POLICY_DENY = 181
DROP_INVALID_SIP = 132
DROP_UNKNOWN_TARGET = 150
DROP_FRAG_NOSUPPORT = 157
DROP_NO_CONFIG = 165
DROP_NAT_NO_MAPPING = 167
DROP_FIB_LOOKUP = 169
DROP_FRAG_NEEDED = 136
DROP_FRAG_NOT_FOUND = 175
DROP_UNKNOWN_L3 = 139
DROP_UNENCRYPTED_TRAFFIC = 195


def reason_text(code: int) -> str:
    """Cilium's text for a metrics/event reason (0 = "Forwarded")."""
    if code == 0:
        return "Forwarded"
    reason = DROP_REASONS.get(code)
    return reason.text if reason else f"Unknown drop reason {code}"


def reason_name(code: int) -> str:
    """Hubble's enum name (DROP_REASON_UNKNOWN when we do not know it)."""
    reason = DROP_REASONS.get(code)
    return reason.hubble_name if reason else "DROP_REASON_UNKNOWN"
