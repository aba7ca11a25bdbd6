"""FQDN policy: Cilium's DNS name matching, the learned-name cache and the DNS proxy's decision core."""
