"""Cluster Mesh: what a cluster exports to others (`export`), the local cache of every remote
cluster's export (`kvstoremesh`, Cilium's KVStoreMesh), the remote cluster configs (`remotes`) and the
sandbox's peering (`sandbox`). The service is `services/clustermesh_apiserver`."""

SERVICE = "clustermesh-apiserver"
