"""k8s-watcher: mirrors the Kubernetes objects Propolis uses into NATS KV (one watch per kind per cluster)."""
