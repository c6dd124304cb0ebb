"""More than one host: modelds form a cluster through one PostgreSQL.

Each host stays the only owner of its backends, leases and in-flight counts; the
database holds only what hosts must share, and each host writes only its own
rows (`schema.py`). Nothing per request touches the database: every modeld keeps
an in-memory view (`view.py`) fed by LISTEN/NOTIFY plus a periodic resync that
is the authority (`membership.py`). Liveness is by the database's clock: a host
renews `lease_expires_at = now() + host_ttl` every `host_ttl/3`; a host that finds
its row fenced re-registers under a new epoch and re-announces its replicas.
A Route without a local READY replica is forwarded, one hop at most, to the
owner of a remote one (`forward.py`, `router.py`); lease ids name their owner.
"""
