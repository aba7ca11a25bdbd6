"""Propolis: eBPF networking, security and observability for Kubernetes.

The shared library every service and the CLI are built from.
"""

__version__ = "0.1.0"
