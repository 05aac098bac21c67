"""The node daemon: a verified, content-addressed artifact cache that pulls from a private swarm."""
