"""Ray Serve integration: runtime_env plugin, readiness, placement (issue 7)."""
