"""identity-allocator: security identities for label sets, and each pod's endpoint record."""
