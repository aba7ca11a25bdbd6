"""Propolis services: each folder wires library parts into one deployable process."""
