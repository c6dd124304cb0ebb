"""modeld: the daemon that owns the model backends of a GPU host."""

__version__ = "0.1.0"
