"""The harness: the sandbox (a Kubernetes cluster on one machine: netns nodes and pods, API server, kubelet,
CNI, probes), the demo, the test fixtures and the benchmark drivers.

It depends on `propolis` and never the other way round (an import-linter contract in `make lint` checks it):
the product runs on any cluster; this package is one cluster it can run on. See docs/architecture.md
"Sandbox conventions"; `propolis sandbox …` drives it (verbs plugged in through the `propolis.cli` entry point).
"""
