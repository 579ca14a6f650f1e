"""Helpers every layer may use: atomic file writes, the allocator setting, autocast
precisions, drawing of instances."""
