"""The scripted scenarios of gpu_check.py, one per group of figures.

Each takes the shared `Run` (daemon, NVML, sizes) and appends its figures. The
order matters and is the one in gpu_check.py's docstring: figures 1, 2 and 5 come
from the first cold start, figure 3 from the eviction scenario, figure 4 from
Unload and `kill -9` last, since it kills the daemon.
"""

import asyncio
import time
from typing import TYPE_CHECKING, Any

import figures as fig
import grpc
from waits import pid_alive, until

from modeld._proto.modeld.v1 import modeld_pb2 as mpb

if TYPE_CHECKING:
    from gpu_check import Run

EVICTION_WAIT_S = 15.0
REFUSAL_MARGIN_S = 1.0


async def first_cold_start(run: "Run") -> None:
    """Figures 5, 1 and 2 from one cold Route of gpu-a."""
    started = time.time()
    lease, report = await run.cold("gpu-a")
    leased = time.time()
    run.figures.append(fig.timing_figure(started, leased, report["marks"]))
    drop = run.nvml.mem().used - run.base.used
    run.per_replica = drop

    # The first figure modeld shows after READY, with no wait: it must already be right
    # (a reading taken at READY, or at least the estimate until one arrives).
    replica = await run.replica(lease.replica_id)
    assert replica is not None, f"replica {lease.replica_id} is not listed right after its lease"
    figure = fig.memory_figure(
        alloc=run.plan.alloc,
        nvml_drop=drop,
        modeld_memory=int(replica.memory),
        estimate=run.plan.estimate,
        backend_free_drop=run.base.free - int(report["free_after"]),
    )
    run.figures.append(figure)
    run.figures.append(
        fig.placement_figure(
            modeld_gpu=replica.gpu,
            report=report,
            nvml_uuids=run.nvml.uuids,
            nvml_pci=run.nvml.pci,
        )
    )
    run.load_checks.append(run.held_check("gpu-a", report, 0, "first"))
    await run.release(lease)


async def fig_wait(probe: Any, limit_s: float) -> Any:
    return await until(probe, limit_s, interval=0.1)


async def eviction(run: "Run") -> None:
    """Figure 3: LRU idle first, never busy, refusals, and memory_threshold pressure."""
    steps: list[fig.Step] = []
    values: dict[str, Any] = {"memory_threshold": run.plan.threshold}
    # b is leased first and stays busy; a is used after it, so b is the least recent.
    lease_b, _ = await run.cold("gpu-b", when="beside a")
    lease_a = await run.route("gpu-a")
    await run.release(lease_a)
    lease_c, _ = await run.cold("gpu-c", when="after evicting a")
    steps += await _victims(run, "third replica (b busy, a idle)", lease_a.replica_id, [lease_b])
    for lease in (lease_b, lease_c):
        await run.release(lease)
    await run.release(await run.route("gpu-c"))  # c is now the most recently used
    lease_a, _ = await run.cold("gpu-a", when="after evicting b")
    steps += await _victims(run, "third replica (b, c idle; b LRU)", lease_b.replica_id, [lease_c])
    lease_c = await run.route("gpu-c")
    steps += await _refusals(run, values, busy=[lease_a, lease_c])
    await run.release(lease_a)
    steps += await _pressure(run, values, idle=lease_a, busy=lease_c)
    await run.release(lease_c)
    strays = [r.id for r in (await run.replicas()).values() if r.model == "gpu-b"]
    steps.append(fig.Step("no replica started for the refused Route", not strays, f"{strays}"))
    run.figures.append(
        fig.steps_figure(3, "eviction: LRU idle first, never busy, clear refusals", steps, **values)
    )


async def _victims(run: "Run", what: str, victim: str, kept: list[Any]) -> list[fig.Step]:
    """The expected victim is gone, evicted for memory; the kept replicas are still READY."""
    live = await run.replicas()
    reason = run.evicted(victim)
    steps = [
        fig.Step(
            f"{what}: LRU idle replica {victim} evicted for memory",
            victim not in live and reason == "memory",
            f"live={victim in live} reason={reason}",
        )
    ]
    for lease in kept:
        replica = live.get(lease.replica_id)
        state = mpb.ReplicaState.Name(replica.state) if replica is not None else "gone"
        steps.append(
            fig.Step(
                f"{what}: {lease.replica_id} kept",
                replica is not None and replica.state == mpb.READY,
                f"state={state} evicted={run.evicted(lease.replica_id)}",
            )
        )
    return steps


async def _refusals(run: "Run", values: dict[str, Any], busy: list[Any]) -> list[fig.Step]:
    """With every replica busy a third one waits and is refused at its deadline; a model
    that can never fit is refused at once; neither evicts anything."""
    steps = []
    for model, timeout, codes in (
        ("gpu-b", 4.0, {grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.RESOURCE_EXHAUSTED}),
        ("gpu-huge", 30.0, {grpc.StatusCode.RESOURCE_EXHAUSTED}),
    ):
        started = time.monotonic()
        try:
            lease = await run.route(model, deadline_s=timeout)
        except grpc.aio.AioRpcError as exc:
            code, message = exc.code(), exc.details() or ""
        else:
            await run.release(lease)
            code, message = grpc.StatusCode.OK, f"got a lease on {lease.replica_id}"
        took = round(time.monotonic() - started, 3)
        # modeld's side of a Route ends a moment after the client's deadline, and there is
        # no event for it: the margin keeps the next step from giving it the room it waits for.
        await asyncio.sleep(REFUSAL_MARGIN_S)
        values[f"refusal_{model}"] = {"code": code.name, "message": message, "seconds": took}
        steps.append(fig.Step(f"{model} refused", code in codes, f"{code.name}: {message}"))
    live = await run.replicas()
    kept = all(lease.replica_id in live for lease in busy)
    steps.append(fig.Step("busy replicas kept through the refusals", kept, f"live={sorted(live)}"))
    waiting = [r for r in run.daemon.log() if r.get("event") == "admission_waiting"]
    values["admission_waiting_logged"] = [str(r.get("why")) for r in waiting][-1:]
    return steps


async def _pressure(run: "Run", values: dict[str, Any], idle: Any, busy: Any) -> list[fig.Step]:
    """memory_threshold lowered under the current use: the idle replica goes, the busy stays."""
    mem = run.nvml.mem()
    threshold = round(max(0.01, mem.used / mem.total - 0.05), 3)
    values["pressure_threshold"] = threshold
    await run.set_threshold(threshold)

    async def gone() -> bool:
        return idle.replica_id not in await run.replicas()

    evicted = await fig_wait(gone, EVICTION_WAIT_S)
    await run.set_threshold(run.plan.threshold)
    reason = run.evicted(idle.replica_id)
    busy_live = (await run.replica(busy.replica_id)) is not None
    return [
        fig.Step(
            f"memory_threshold {threshold}: idle replica evicted",
            bool(evicted) and reason == "memory",
            f"evicted={bool(evicted)} reason={reason}",
        ),
        fig.Step(
            f"memory_threshold {threshold}: busy replica kept",
            busy_live and run.evicted(busy.replica_id) is None,
            f"live={busy_live} evicted={run.evicted(busy.replica_id)}",
        ),
    ]


async def release(run: "Run") -> None:
    """Figure 4: baseline after Unload, after kill -9, and no start into held memory."""
    steps: list[fig.Step] = []
    values: dict[str, Any] = {}
    for model in ("gpu-a", "gpu-b", "gpu-c"):
        await run.daemon.stub.Unload(mpb.UnloadRequest(model=model, force=True), timeout=60)
    back = await run.settle()
    values["unload_to_baseline_s"] = back
    steps.append(fig.Step("memory back to baseline after Unload", back is not None, f"{back} s"))

    lease, report = await run.cold("gpu-a", when="after Unload")
    await run.release(lease)
    old_pid = int(report["pid"])
    killed_at = time.monotonic()
    await run.daemon.kill9()
    values["old_backend_alive_after_kill"] = pid_alive(old_pid)
    freed = asyncio.ensure_future(run.settle(since=killed_at))
    await run.daemon.start()
    values["restart_s"] = round(time.monotonic() - killed_at, 3)
    values["old_backend_alive_after_restart"] = pid_alive(old_pid)
    lease, report = await run.cold("gpu-a", when="after kill -9 and restart")
    back = await freed
    values["kill9_to_baseline_s"] = back
    steps.append(
        fig.Step("memory back to baseline after kill -9 of modeld", back is not None, f"{back} s")
    )
    steps.append(
        fig.Step("old backend gone after the restart", not pid_alive(old_pid), f"pid {old_pid}")
    )
    await run.release(lease)
    steps += run.load_checks
    steps += await _final_stop(run, values)
    run.figures.append(fig.steps_figure(4, "release: memory back to baseline", steps, **values))


async def _final_stop(run: "Run", values: dict[str, Any]) -> list[fig.Step]:
    code = await run.daemon.stop()
    back = await run.settle()
    left = sorted(pid for pid in run.pids if pid_alive(pid))
    values["stop_exit_code"] = code
    values["stop_to_baseline_s"] = back
    return [
        fig.Step("daemon stops cleanly (SIGTERM)", code == 0, f"exit {code}"),
        fig.Step("memory back to baseline after the daemon stopped", back is not None, f"{back} s"),
        fig.Step("no backend process left", not left, f"alive: {left}"),
    ]
