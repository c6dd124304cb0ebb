"""Capacity: resource readings, admission of new replicas, and the watchdog that evicts."""
