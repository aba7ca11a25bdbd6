"""The sandbox: a Kubernetes cluster on one machine (netns nodes and pods, API server, kubelet, CNI, probes).

See docs/architecture.md "Sandbox conventions"; `propolis sandbox …` drives it.
"""
