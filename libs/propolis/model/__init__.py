"""The security model shared by every service: labels, label selectors, identities, DNS name selectors.

Pure Python, no I/O: the identity-allocator, the datapath-writer and the CLI all
derive labels and match selectors with these same functions, so they can never
disagree about which identity a selector names.
"""
