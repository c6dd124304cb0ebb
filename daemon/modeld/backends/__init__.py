"""Backends that ship with modeld (the demo backend used by the default config and tests)."""
