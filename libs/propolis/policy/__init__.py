"""Policy: parse and validate NetworkPolicy / CiliumNetworkPolicy, and compile them per endpoint.

* `parse.parse_policy_object(kind, obj)` -> `rules.Policy` (ValidationError naming the field)
* `engine.PolicyEngine` -> per-endpoint `engine.CompileResult` of `entries.PolicyEntry` rows
* `selectorcache.SelectorCache` -> which identities each selector matches
Pure Python: no I/O, no datapath imports.
"""
