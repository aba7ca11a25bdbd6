"""The `propolis-cni` CNI plugin: wires a pod's eth0 to its node and announces the endpoint to the datapath."""
