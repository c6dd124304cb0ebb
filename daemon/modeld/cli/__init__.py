"""The `modeld` command: `serve` and client verbs for people."""
