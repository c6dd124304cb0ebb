"""The client's shared rules (`modeld.client.rules`): pure, so tested without a daemon."""

import grpc
import pytest

from modeld._proto.modeld.v1 import modeld_pb2 as pb
from modeld.client import rules
from modeld.client.lease import BackendFailed, BackendUnreachable, Lease
from modeld.errors import RETRY_KEY


class Error(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode, retry: str | None = None) -> None:
        self._code = code
        self._trailing = () if retry is None else ((RETRY_KEY, retry),)

    def code(self) -> grpc.StatusCode:
        return self._code

    def trailing_metadata(self) -> tuple[tuple[str, str], ...]:
        return self._trailing


def lease() -> Lease:
    return Lease("l1", "r1", "127.0.0.1:1", "grpc", cold_start=False, expires_at=1000.0)


@pytest.mark.parametrize(
    ("code", "now", "pause"),
    [
        (grpc.StatusCode.UNAVAILABLE, 0.0, 1.0),  # the retry delay
        (grpc.StatusCode.UNAVAILABLE, 9.5, 0.5),  # never past the deadline (10)
        (grpc.StatusCode.UNAVAILABLE, 11.0, 0.0),
        (grpc.StatusCode.NOT_FOUND, 0.0, None),  # final: raised as it is
        (grpc.StatusCode.DEADLINE_EXCEEDED, 0.0, None),
    ],
)
def test_only_unavailable_is_retried_once_within_the_deadline(
    code: grpc.StatusCode, now: float, pause: float | None
) -> None:
    assert rules.retry_pause(Error(code), 1.0, deadline=10.0, now=now) == pause


@pytest.mark.parametrize(
    ("retry", "pause"),
    [
        ("no", None),  # modeld answered (e.g. the start failed): starting again cannot help
        ("yes", 1.0),  # modeld lost a race and says the same Route may win now
        (None, 1.0),  # no modeld answered: it was unreachable or restarting
    ],
)
def test_an_unavailable_modeld_answered_is_retried_only_when_it_says_so(
    retry: str | None, pause: float | None
) -> None:
    error = Error(grpc.StatusCode.UNAVAILABLE, retry)
    assert rules.retry_pause(error, 1.0, deadline=10.0, now=0.0) == pause


def test_renewal_comes_at_a_third_of_the_time_left_and_never_busy_loops() -> None:
    assert rules.renew_interval(expires_at=1000.0, wall_now=970.0) == pytest.approx(10.0)
    assert rules.renew_interval(expires_at=1000.0, wall_now=1000.0) == rules.MIN_RENEW_INTERVAL
    assert rules.time_left(expires_at=1000.0, wall_now=2000.0) == rules.MIN_RENEW_INTERVAL


@pytest.mark.parametrize(
    ("code", "wall_now", "over"),
    [
        (grpc.StatusCode.NOT_FOUND, 900.0, True),  # released or expired on the daemon
        (grpc.StatusCode.UNAVAILABLE, 900.0, False),  # try again at the next interval
        (grpc.StatusCode.UNAVAILABLE, 1000.0, True),  # past its expiry: gone anyway
    ],
)
def test_renewing_ends_when_the_lease_is_gone(
    code: grpc.StatusCode, wall_now: float, over: bool
) -> None:
    assert rules.renewal_over(Error(code), expires_at=1000.0, wall_now=wall_now) is over


def test_the_outcome_is_what_the_block_raised_else_what_it_marked() -> None:
    held = lease()
    assert rules.outcome_of(held, None, ()) == pb.OK
    assert rules.outcome_of(held, ValueError("bug"), ()) == pb.OK
    assert rules.outcome_of(held, BackendUnreachable(), ()) == pb.BACKEND_UNREACHABLE
    assert rules.outcome_of(held, ConnectionError(), (OSError,)) == pb.BACKEND_UNREACHABLE
    assert rules.outcome_of(held, BackendFailed(), ()) == pb.BACKEND_ERROR
    held.failed(ValueError("500"))
    assert rules.outcome_of(held, None, ()) == pb.BACKEND_ERROR


def test_a_failed_release_is_raised_or_noted_on_the_blocks_own_error() -> None:
    failure = Error(grpc.StatusCode.UNAVAILABLE)
    with pytest.raises(Error):
        rules.release_failed(lease(), failure, None)
    own = ValueError("the block's")
    rules.release_failed(lease(), failure, own)
    assert own.__notes__ == [f"and releasing lease l1 failed too: {failure}"]


def test_requests_and_deadlines() -> None:
    held = lease()
    assert rules.release_request(held, None).outcome == pb.OK
    assert rules.release_request(held, pb.BACKEND_ERROR).outcome == pb.BACKEND_ERROR
    assert rules.renew_request(held).lease_id == "l1"
    assert rules.deadline_for(5.0, timeout=300.0) == 305.0
    assert rules.deadline_for(5.0, timeout=300.0, limit=2.0) == 7.0
    assert rules.call_timeout(deadline=7.0, now=8.0) == 0.0


@pytest.mark.parametrize(
    ("owner", "connected", "target"),
    [
        ("", "a:1", None),  # a single host names no owner
        ("a:1", "a:1", None),  # the connected modeld owns it
        ("b:2", "a:1", "b:2"),  # forwarded: straight to the owner
    ],
)
def test_release_and_renew_go_to_the_owner_only_when_it_is_another_modeld(
    owner: str, connected: str, target: str | None
) -> None:
    held = lease()
    held.owner_address = owner
    assert rules.owner_target(held, connected) == target


def test_only_an_unreachable_or_refusing_owner_is_asked_through_the_connected_modeld() -> None:
    assert rules.try_connected(Error(grpc.StatusCode.UNAVAILABLE))
    assert rules.try_connected(Error(grpc.StatusCode.UNAUTHENTICATED))
    assert not rules.try_connected(Error(grpc.StatusCode.NOT_FOUND))


def test_an_unreachable_on_exception_leaves_the_block_as_backend_unreachable() -> None:
    held = lease()
    reset = ConnectionResetError("peer reset")
    raised = rules.escalated(reset, held, (ConnectionError,))
    assert isinstance(raised, BackendUnreachable) and raised.__cause__ is reset
    assert held.outcome == pb.BACKEND_UNREACHABLE
    bug = ValueError("bug")
    assert rules.escalated(bug, lease(), (ConnectionError,)) is bug
    own = BackendUnreachable("already")
    assert rules.escalated(own, lease(), (Exception,)) is own
