"""The marker of a call one modeld forwarded to another, in one format for every call.

It travels as the `modeld-forwarded` metadata of a unary call (`info.FORWARDED`) or
in the `forwarded` field of a RouteStream message. Any value at all marks the call
forwarded: its receiver answers from its own memory and never forwards it on, so a
call makes one hop at most. The value is `;`-separated `key=value` fields, led by
the format's version (`v=1`); a receiver ignores fields it does not know, so that a
later version may add some:

- `replica`, `gen`: a Route's, the replica the forwarder picked and its generation;
  `below` when the forwarder has a replica of its own, the in-flight the owner's
  must be below (else it declines: the hop is not worth it);
- `slot`, `claim`: a Load's that starts a replica under a cluster slot claim
  (claims.py), so that its target publishes the replica under that claim.

Release and RenewLease carry the version alone (`v=1`). A value in another format
(an older modeld's) still marks the call forwarded, but names no replica and no claim.
"""

from dataclasses import dataclass

VERSION = "1"


@dataclass(frozen=True, slots=True)
class Marker:
    replica: str = ""
    gen: int = 0
    below: int | None = None
    slot: int | None = None
    claim: int | None = None

    def encode(self) -> str:
        fields = [f"v={VERSION}"]
        if self.replica:
            fields += [f"replica={self.replica}", f"gen={self.gen}"]
        if self.below is not None:
            fields.append(f"below={self.below}")
        if self.slot is not None and self.claim is not None:
            fields += [f"slot={self.slot}", f"claim={self.claim}"]
        return ";".join(fields)


# What Release and RenewLease carry, and a Load that binds to no claim.
PLAIN = Marker().encode()


def parse(text: str) -> Marker:
    """The fields of a marker; what it cannot read (or a marker in another format) it
    leaves out: a replica without a readable generation names no replica."""
    fields = dict(field.partition("=")[::2] for field in text.split(";"))
    if fields.get("v") != VERSION:
        return Marker()
    gen = _number(fields, "gen")
    replica = fields.get("replica", "") if gen is not None else ""
    below, slot, claim = (_number(fields, key) for key in ("below", "slot", "claim"))
    return Marker(replica, gen or 0, below, slot, claim)


def marker_of(forwarded: str) -> Marker | None:
    """The marker of a call ("" for one no modeld forwarded: None)."""
    return parse(forwarded) if forwarded else None


def _number(fields: dict[str, str], key: str) -> int | None:
    value = fields.get(key, "")
    return int(value) if value.isdigit() else None
