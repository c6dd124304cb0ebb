"""`modeld load` with live progress: the model's replica events, printed as they happen.

The event watch is opened before Load is sent, and a Ping round trip separates
the two: the daemon takes the RPCs of one connection in arrival order, so by the
time Ping answers the watch is subscribed, before Load spawns anything. Load's reply can
overtake the last events (they travel on another stream), so the watch stays
open until every replica it saw has settled, or for a short grace at most.
"""

import threading
import time
from collections.abc import Callable, Iterable
from typing import Any, TextIO

import grpc

from modeld._proto.modeld.v1 import modeld_pb2 as pb
from modeld.cli.connect import Session
from modeld.cli.render import phase

# How long the watch may lag behind Load's reply before it is cut off.
SETTLE_GRACE = 1.0
_SETTLED = frozenset({pb.READY, pb.FAILED, pb.STOPPED})


class Progress:
    """One line per phase change, with the seconds since the load began."""

    def __init__(self, out: TextIO, started: float, clock: Callable[[], float]) -> None:
        self._out = out
        self._started = started
        self._clock = clock
        self._lock = threading.Lock()
        self._seen: set[str] = set()
        self._settled: set[str] = set()

    def show(self, event: pb.Event) -> None:
        elapsed = self._clock() - self._started
        reason = f"  {event.reason}" if event.reason else ""
        self._out.write(
            f"{elapsed:7.2f}s  {event.replica_id}  {phase(event.to_state):<13}{reason}\n"
        )
        self._out.flush()
        with self._lock:
            self._seen.add(event.replica_id)
            if event.to_state in _SETTLED:
                self._settled.add(event.replica_id)

    def settled(self, replica_ids: Iterable[str]) -> bool:
        """True when every one of these replicas seen starting has reached an end state;
        one never seen was ready before the load and has nothing to show."""
        with self._lock:
            return all(r in self._settled for r in replica_ids if r in self._seen)


def _reply_ids(future: Any) -> list[str]:
    if future.exception() is not None:
        return []
    return [r.id for r in future.result().replicas]


def watch(session: Session, model: str, *, cluster: bool = False) -> Any:
    """The event stream of `model` ("" for all), subscribed by the time this returns;
    `cluster`: other hosts' replica changes too."""
    md = session.metadata
    request = pb.WatchEventsRequest(model=model, cluster=cluster)
    events = session.stub.WatchEvents(request, metadata=md)
    try:
        session.stub.Ping(pb.PingRequest(), timeout=session.timeout, metadata=md)
    except grpc.RpcError:
        events.cancel()
        raise
    return events


def load_with_progress(
    session: Session, request: pb.LoadRequest, out: TextIO, started: float
) -> pb.LoadResponse:
    events = watch(session, request.model)
    try:
        future = session.stub.Load.future(
            request, timeout=session.timeout, metadata=session.metadata
        )
    except grpc.RpcError:
        events.cancel()
        raise
    progress = Progress(out, started, time.monotonic)

    def finished(f: Any) -> None:
        if f.exception() is not None or progress.settled(_reply_ids(f)):
            events.cancel()
            return
        timer = threading.Timer(SETTLE_GRACE, events.cancel)
        timer.daemon = True
        timer.start()

    future.add_done_callback(finished)
    try:
        for event in events:
            progress.show(event)
            if future.done() and progress.settled(_reply_ids(future)):
                break
    except grpc.RpcError:
        pass  # cancelled once Load is done; any real failure shows in Load's own result
    finally:
        events.cancel()
    reply: pb.LoadResponse = future.result()
    return reply
