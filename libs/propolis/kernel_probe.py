"""What this kernel can do, probed for real (not assumed) in a throw-away network namespace.

Used by `propolis status` and by services deciding their fallbacks (e.g.
"sch_fq missing: BandwidthManager falls back to …"). Each probe creates what it
tests inside a private namespace that is deleted afterwards, so nothing leaks
and no traffic leaves.
"""

from __future__ import annotations

import os
import subprocess
import uuid
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path


@dataclass(frozen=True)
class KernelFeature:
    name: str
    available: bool
    detail: str


def _ip(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=10)


def _in_scratch_netns(commands: list[list[str]]) -> tuple[bool, str]:
    """Run commands in a fresh namespace; (all succeeded, first error)."""
    ns = f"pp-probe-{uuid.uuid4().hex[:8]}"
    created = _ip("netns", "add", ns)
    if created.returncode != 0:
        return False, created.stderr.strip() or "cannot create a network namespace"
    try:
        for cmd in commands:
            r = subprocess.run(["ip", "netns", "exec", ns, *cmd], capture_output=True, text=True, timeout=10)
            if r.returncode != 0:
                return False, (r.stderr or r.stdout).strip().splitlines()[0] if (r.stderr or r.stdout) else "failed"
        return True, ""
    finally:
        _ip("netns", "del", ns)


@lru_cache(maxsize=1)
def probe_all() -> tuple[KernelFeature, ...]:
    if os.geteuid() != 0:
        return (KernelFeature("probes", False, "not root: kernel features not probed"),)
    feats = []
    ok, err = _in_scratch_netns([["ip", "link", "add", "pp0", "type", "veth", "peer", "name", "pp1"],
                                 ["tc", "qdisc", "add", "dev", "pp0", "root", "fq"]])
    feats.append(KernelFeature("sch_fq", ok, "fq qdisc available" if ok else f"sch_fq missing ({err})"))
    ok, err = _in_scratch_netns([["ip", "link", "add", "wg0", "type", "wireguard"]])
    feats.append(KernelFeature("wireguard", ok, "kernel WireGuard" if ok else f"no kernel WireGuard ({err})"))
    ok, err = _in_scratch_netns([["ip", "xfrm", "policy", "add", "src", "192.0.2.1", "dst", "192.0.2.2", "dir", "out",
                                  "tmpl", "src", "192.0.2.1", "dst", "192.0.2.2", "proto", "esp", "mode", "tunnel"]])
    feats.append(KernelFeature("xfrm", ok, "XFRM policies available" if ok else f"no XFRM ({err})"))
    ok, err = _in_scratch_netns([["ip", "xfrm", "state", "add", "src", "192.0.2.1", "dst", "192.0.2.2",
                                  "proto", "esp", "spi", "0x100", "mode", "tunnel",
                                  "auth", "hmac(sha256)", "0x" + "11" * 32, "enc", "cbc(aes)", "0x" + "22" * 16]])
    feats.append(KernelFeature("xfrm-esp", ok, "ESP states (IPsec) available" if ok else f"no ESP support ({err})"))
    ok, err = _in_scratch_netns([["ip", "link", "add", "pp0", "type", "veth", "peer", "name", "pp1"],
                                 ["tc", "qdisc", "add", "dev", "pp0", "clsact"]])
    feats.append(KernelFeature("clsact", ok, "tc clsact available" if ok else f"no clsact ({err})"))
    bpffs = Path("/sys/fs/bpf")
    mounted = any(line.split()[1] == str(bpffs) and line.split()[2] == "bpf"
                  for line in Path("/proc/mounts").read_text().splitlines())
    feats.append(KernelFeature("bpffs", mounted, "mounted at /sys/fs/bpf" if mounted else "bpffs not mounted"))
    wg_go = any((Path(d) / "wireguard-go").exists() for d in os.environ.get("PATH", "/usr/bin").split(":"))
    feats.append(KernelFeature("wireguard-go", wg_go, "userspace WireGuard available" if wg_go
                               else "wireguard-go not installed"))
    return tuple(feats)
