"""modelcast: publish model weights and runtime layers once, pull them everywhere over a private swarm."""

__version__ = "0.1.0"
