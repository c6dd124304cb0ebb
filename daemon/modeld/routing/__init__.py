"""Routing: the Route hot path, leases, model pools, probes and counter flushing."""
