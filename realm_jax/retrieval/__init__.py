"""Retrieval: exact sharded MIPS, ScaNN index, versioned index store, async refresher."""
