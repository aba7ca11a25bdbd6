"""FQDN policy: the learned-name cache and the DNS proxy's decision core (DNS name matching: propolis.model.matchpattern)."""
