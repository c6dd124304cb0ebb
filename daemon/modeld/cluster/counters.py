"""What the cluster layer counts for metrics: plain integers, one owner each.

The ClusterRouter holds one instance; each component increments only its own
fields, and ops/metrics.py reads them all at scrape time.
"""

from dataclasses import dataclass


@dataclass
class ClusterCounters:
    forwards: int = 0
    forward_retries: int = 0
    claims_taken: int = 0
    claims_taken_over: int = 0
    claims_lost: int = 0
    placement_refusals: int = 0
