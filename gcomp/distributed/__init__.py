"""Distributed execution of partitioned models: communicators (MPI, simulated) and per-rank runners."""
