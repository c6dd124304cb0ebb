"""Where the daemon's CPU goes under the warm Route+Release load (a tool, not a figure).

Starts the daemon like `route_bench.py` (echo model, 2 READY replicas), runs
Route+Release pairs at `--concurrency` for `--seconds` while `py-spy record`
samples the daemon (`pip install py-spy`), and prints the functions with the most
samples, inclusive and self, as a share of all the daemon's samples. The collapsed
stacks are kept in `--out` for a flame graph.

    python bench/route_profile.py --concurrency 16 --seconds 10
"""

import argparse
import asyncio
import shutil
import sys
import tempfile
from collections import Counter
from pathlib import Path

import harness
from harness import (
    HERE,
    BenchError,
    Series,
    daemon_command,
    route_pair,
    serving,
    stream_pair,
    warm_up,
)
from modeld._proto.modeld.v1 import modeld_pb2 as pb
from route_bench import CONFIG, MODEL, REPLICAS

TOOL = "route_profile"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument(
        "--workload", choices=["route", "stream"], default="route", help="unary or RouteStream"
    )
    parser.add_argument("--rate", type=int, default=250, help="py-spy samples per second")
    parser.add_argument("--top", type=int, default=30)
    parser.add_argument("--out", type=Path, default=HERE / "results" / "route_profile.txt")
    return parser.parse_args()


async def profile(args: argparse.Namespace) -> None:
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    with tempfile.TemporaryDirectory(prefix="modeld-profile-") as tmp:
        command = daemon_command(
            "modeld", CONFIG, Path(tmp), args.out.parent / "modeld.log", replicas=REPLICAS
        )
        async with serving([command]) as (daemon,):
            await daemon.stub.Load(pb.LoadRequest(model=MODEL, replicas=REPLICAS), timeout=30)
            pair = (
                route_pair(daemon.stub, MODEL)
                if args.workload == "route"
                else stream_pair(daemon.stub, MODEL)
            )
            await warm_up(pair, args.concurrency, 1.0)
            record = await asyncio.create_subprocess_exec(
                *(spy, "record", "--pid", str(daemon.proc.pid), "--rate", str(args.rate)),
                *("--duration", str(int(args.seconds)), "--format", "raw"),
                *("--output", str(args.out), "--nonblocking"),
                stdout=asyncio.subprocess.DEVNULL,
            )
            await Series("route", args.concurrency).run(pair, args.seconds + 1)
            if await record.wait() != 0:
                raise BenchError(f"py-spy record exited with {record.returncode}")


def summary(path: Path, top: int) -> str:
    inclusive: Counter[str] = Counter()
    own: Counter[str] = Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        n = int(count)
        total += n
        frames = stack.split(";")
        for frame in set(frames):
            inclusive[frame] += n
        own[frames[-1]] += n
    lines = [f"{total} samples of the daemon"]
    for title, table in (("inclusive", inclusive), ("self", own)):
        lines.append(f"\ntop {top} by {title} samples")
        for frame, n in table.most_common(top):
            lines.append(f"  {100 * n / total:5.1f}%  {frame}")
    return "\n".join(lines)


def main() -> int:
    args = parse_args()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    try:
        asyncio.run(profile(args))
    except BenchError as exc:
        harness.progress(TOOL, str(exc))
        return 1
    print(summary(args.out, args.top))
    print(f"\ncollapsed stacks: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
