"""Cilium's Bandwidth Manager: per-pod rate limits from the `kubernetes.io/egress-bandwidth` and
`kubernetes.io/ingress-bandwidth` annotations, with the best shaper the kernel has.

`annotations` parses the annotations (Kubernetes quantities), `shaper` picks the mode (EDT + fq where
the kernel has sch_fq, tbf otherwise) and writes/reads the qdiscs, `measure` measures a shaped TCP rate
(the integration test and `propolis bench node`). The datapath-writer applies it through
`writer/bandwidth.py`'s reconciler target.
"""
