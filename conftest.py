pytest_plugins = ["propolis.testing.fixtures"]
