from hubble_node import hub  # noqa: F401 - the module-scoped fixture
