"""The NATS bus: names, codec, connection, KV watch helpers, embedded server, permissions.

Everything a service says to another goes through here; `subjects` is the only
module that spells a subject or a bucket name.
"""
