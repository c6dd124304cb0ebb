"""A replica's process lifecycle: spawn, readiness, load, stop, exit watch, orphan clean-up."""
