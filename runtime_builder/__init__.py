"""Accelerator-specific runtime layers (CPU / CUDA / CANN) under one runtime index (issue 6)."""
