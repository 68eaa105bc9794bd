"""Shard formats: listing, DALI index files, writers and readers."""
