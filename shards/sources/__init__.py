"""Shard sources for real corpora, one module each (see shards.build.SOURCES for the registry)."""
