"""Publish a directory as an immutable, content-addressed artifact."""
