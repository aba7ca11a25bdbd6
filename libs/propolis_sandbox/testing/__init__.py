"""pytest fixtures shared by tests/ and integration/: real nats-server, connected buses."""
