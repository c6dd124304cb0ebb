"""A claimed replica's bind notification carries the replica: a receiver puts it in
its view at once (no reread on the cold start's path), and still rereads the host,
which stays the authority."""

from modeld.clock import SystemClock
from modeld.cluster.membership import Membership, replica_notice
from modeld.cluster.view import RemoteHost
from modeld.config import ClusterConfig
from modeld.ops.events import EventBus
from modeld.state import ReplicaState

ROW = ("r1", "m", "READY", "127.0.0.1:9", 0, 0, 0.0, 0)


def member() -> Membership:
    cfg = ClusterConfig(
        dsn="postgresql://x/y",
        dsn_file="",
        host_id="me",
        advertise="127.0.0.1:1",
        backend_host="127.0.0.1",
        host_ttl=2.0,
    )
    m = Membership(cfg, cfg.dsn, SystemClock(), EventBus(), list)
    m.view.replace_all([RemoteHost("b", 7, "b:1", "node", {}, 1e12)], [])
    return m


def notify(m: Membership, payload: str) -> None:
    m._notified(None, 0, "modeld_cluster", payload)


def test_the_carried_replica_is_in_the_view_at_once_and_the_host_reread() -> None:
    m = member()
    changed = m.changed()
    notify(m, replica_notice("b", 7, ROW))
    replica = m.view.replicas["r1"]
    assert (replica.host_id, replica.model, replica.state) == ("b", "m", ReplicaState.READY)
    assert changed.is_set()
    assert m._pending == {"b"}


def test_a_notice_of_another_epoch_or_unknown_host_waits_for_the_reread() -> None:
    m = member()
    notify(m, replica_notice("b", 6, ROW))
    notify(m, replica_notice("c", 1, ROW))
    notify(m, "b {not json")
    assert m.view.replicas == {}
    assert m._pending == {"b", "c"}


def test_a_plain_notification_names_a_host_and_this_host_ignores_its_own() -> None:
    m = member()
    notify(m, "b")
    notify(m, replica_notice("me", 1, ROW))
    assert m._pending == {"b"}
    assert m.view.replicas == {}
