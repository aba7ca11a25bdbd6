"""The datapath-writer's settings (flags, environment, the chart's values): one place, read by its components."""

from __future__ import annotations

from dataclasses import dataclass

from propolis.errors import ValidationError
from propolis.maps import lb as lbmaps
from propolis.runtime.settings import CommonSettings, setting


@dataclass
class Settings(CommonSettings):
    node_netns: str = setting("", "network namespace of the node's lxc interfaces (empty = this one)")
    bpf_pin_dir: str = setting("", "bpffs directory of this node's maps (empty = /sys/fs/bpf/propolis/<node>)")
    datapath_socket: str = setting("/run/propolis/datapath.sock", "unix socket the CNI plugin announces endpoints on")
    policy_enforcement: str = setting("default", "Cilium's policy enforcement mode",
                                      choices=("default", "always", "never"))
    policy_default_local_cluster: bool = setting(True, "Cluster Mesh (cluster id > 0): a policy selector without "
                                                       "io.cilium.k8s.policy.cluster selects only this cluster")
    allow_localhost: str = setting("always", "Cilium's allow-localhost: 'always' = a pod's own node reaches it "
                                             "whatever the ingress policy (kubelet probes), 'policy' = only if "
                                             "a rule allows the host", choices=("always", "policy"))
    policy_audit_mode: bool = setting(False, "Cilium's policyAuditMode: every endpoint's would-be policy drops are "
                                             "forwarded and reported as AUDIT verdicts (per endpoint: "
                                             "`propolis endpoint config NS/POD PolicyAuditMode=Enabled`)")
    host_firewall: bool = setting(False, "Cilium's hostFirewall.enabled: the node is an endpoint (identity host) "
                                         "whose policy, from CiliumClusterwideNetworkPolicies with a nodeSelector, "
                                         "is enforced on `devices` and for its own pods' connections to it")
    identity_wait: float = setting(3.0, "how long a CNI ADD waits for the pod's identity before the endpoint "
                                        "starts as deny-all (fail closed)", unit="s")
    recompute_debounce: float = setting(0.005, "coalesce input changes for this long before recomputing", unit="s")
    kube_proxy_replacement: bool = setting(True, "Cilium's kubeProxyReplacement: Service load-balancing in eBPF "
                                                 "(false = left to kube-proxy)")
    lb_algorithm: str = setting("random", "Cilium's loadBalancer.algorithm", choices=("random", "maglev"))
    bpf_lb_sock: bool = setting(False, "Cilium's bpf-lb-sock (socketLB.enabled): processes in the node's own "
                                       "network namespace reach Services through cgroup connect4/sendmsg4/"
                                       "recvmsg4/getpeername4 programs on `cgroup-root` (hostNamespaceOnly)")
    cgroup_root: str = setting("", "Cilium's cgroup-root: the cgroup v2 directory whose processes socket LB "
                                   "applies to (the node's own cgroup in the sandbox; the host's cgroup2 mount "
                                   "on a real node)")
    map_dynamic_size_ratio: float = setting(0.0, "Cilium's bpf.mapDynamicSizeRatio: conntrack and NAT maps sized "
                                                 "from this share of memory (0 = fixed 64k/32k)")
    events_rate_limit: int = setting(0, "Cilium's bpf.events.default.rateLimit: datapath events per second per "
                                        "endpoint, so one flooded pod cannot starve the others' (0 = no limit)",
                                     unit="1/s")
    events_burst_limit: int = setting(0, "Cilium's bpf.events.default.burstLimit (0 = the rate)")
    maglev_table_size: int = setting(lbmaps.MAGLEV_TABLE_SIZE, "Cilium's maglev.tableSize (a prime from Cilium's list)")
    devices: str = setting("", "Cilium's devices: comma-separated node interfaces that get the NodePort "
                               "program (cil_from_netdev)")
    reconcile_refresh_interval: float = setting(10.0, "every reconciler re-applies its desired state against the "
                                                      "maps as read back this often (repairs drift)", unit="s")
    conntrack_gc_interval: float = setting(0.0, "Cilium's conntrack-gc-interval (0 = adapt to how full the "
                                                "tables are)", unit="s")
    conntrack_gc_max_interval: float = setting(12 * 3600.0, "Cilium's conntrack-gc-max-interval", unit="s")
    enable_bandwidth_manager: bool = setting(False, "Cilium's enable-bandwidth-manager (bandwidthManager.enabled): "
                                                    "shape pods to their kubernetes.io/egress-bandwidth and "
                                                    "ingress-bandwidth annotations")
    encryption_strict_mode_enabled: bool = setting(False, "Cilium's encryption.strictMode.enabled: pod traffic "
                                                          "between two addresses of encryption.strictMode.cidr "
                                                          "leaving a device of `devices` unencrypted is dropped "
                                                          "(UNENCRYPTED_TRAFFIC)")
    encryption_strict_mode_cidr: str = setting("", "Cilium's encryption.strictMode.cidr (the pod CIDR; required "
                                                   "with strict mode)")
    encryption_strict_mode_allow_remote_node_identities: bool = setting(
        False, "Cilium's encryption.strictMode.allowRemoteNodeIdentities: traffic to node addresses inside the "
               "strict CIDR passes unencrypted (node and pod CIDRs overlap)")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.encryption_strict_mode_enabled and not self.encryption_strict_mode_cidr:
            raise ValidationError("encryption_strict_mode_cidr", "strict mode needs the CIDR to enforce it on")
        if self.bpf_lb_sock and not self.cgroup_root:
            raise ValidationError("cgroup_root", "socket LB attaches to a cgroup v2 directory: name it (never "
                                                 "assumed: on a shared machine the root cgroup is every process)")
        if self.encryption_strict_mode_enabled and not self.devices:
            raise ValidationError("devices", "strict mode is enforced on the node's devices: name at least one")
