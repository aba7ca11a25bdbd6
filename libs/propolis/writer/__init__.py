"""The datapath-writer's library parts: cluster inputs from KV, local endpoints, desired maps."""
