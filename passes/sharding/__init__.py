"""Sharding annotation, propagation, checking and partitioning (IR v11 sharding specs)."""
