"""Domain errors. Each kind maps to exactly one gRPC status code in api/status.py.

Messages are written for a person: they say what was wrong and what to do.
"""


class ModeldError(Exception):
    """Base of every error the daemon reports to a client."""


class InvalidArgument(ModeldError):
    """The request itself is malformed; retrying it unchanged cannot succeed."""


class NotFound(ModeldError):
    """A named model, backend, replica or lease does not exist."""


class FailedPrecondition(ModeldError):
    """The request is valid but the system is not in a state that allows it."""


class ResourceExhausted(ModeldError):
    """There is no room (memory, replica slots) and nothing may be evicted for it."""


class Unavailable(ModeldError):
    """A transient failure: a backend failed to start, the registry cannot write."""


class RetryRoute(Unavailable):
    """The Route lost a race that the same Route, sent again at once, can win."""


class PeerUnreachable(Unavailable):
    """Another modeld gave no answer of its own (refused, reset, gone): ask another host.

    Told from an UNAVAILABLE the peer itself answered by the `RETRY_KEY` trailer that
    every modeld refusal carries, never by the message's words."""


# The trailing metadata key of every error modeld answers: "yes" when the same call,
# sent again at once, may succeed (RetryRoute), else "no". A client that gets an
# UNAVAILABLE without it reached no modeld (modeld.client retries only those two).
RETRY_KEY = "modeld-retry"


class DeadlineExceeded(ModeldError):
    """The caller's deadline passed before the work finished."""


class ConfigError(Exception):
    """The configuration is invalid; the daemon refuses to start (exit code 2)."""


class RegistryError(Exception):
    """The database cannot be used as it is (corrupt, foreign, or from a newer modeld)."""
