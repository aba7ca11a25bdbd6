pytest_plugins = ["propolis_sandbox.testing.fixtures"]
