"""Routing: the Route hot path, leases, model pools and queues, probes, the health judge."""
