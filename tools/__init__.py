"""Shard building, verification, export and benchmark entry points."""
