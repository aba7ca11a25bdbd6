"""datapath-writer: one per node; owns the node's BPF programs and maps."""
