"""What a replica will run, decided before anything is spawned (pure: no I/O but path checks).

Everything that can be wrong with a model spec or a backend entry (a model file
outside models_dir, a load option that is not a number) is found here, so a bad
request fails with InvalidArgument and never starts a process.
"""

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from modeld import load_options
from modeld.errors import InvalidArgument
from modeld.ops.logstore import MIN_MAX_LINE
from modeld.spec import PLACEHOLDERS, BackendSpec, ModelSpec, resolve_model_file
from modeld.supervisor.backend_client import host_port
from modeld.supervisor.sweep import MARKER

_PLACEHOLDER = re.compile(r"\{(" + "|".join(PLACEHOLDERS) + r")\}")


@dataclass(frozen=True)
class LaunchPlan:
    """Everything about starting one replica except the port, which each attempt picks."""

    command: tuple[str, ...]
    model_file: str  # absolute and inside models_dir, or "" when the spec names none
    models_dir: str
    python: str
    env: Mapping[str, str]
    cwd: str | None
    load: load_options.ModelLoad

    def argv(self, host: str, port: int) -> list[str]:
        values = {
            "addr": host_port(host, port),
            "host": host,
            "port": str(port),
            "model_file": self.model_file,
            "models_dir": self.models_dir,
            "python": self.python,
        }
        return [_PLACEHOLDER.sub(lambda m: values[m[1]], arg) for arg in self.command]


def plan_launch(
    spec: ModelSpec,
    backend: BackendSpec,
    models_dir: Path,
    *,
    python: str,
    base_env: Mapping[str, str],
    gpu_ids: tuple[int, ...] = (),
    owner: str = "",
) -> LaunchPlan:
    """Resolve the model file and options of `spec`; raises InvalidArgument.

    `owner` becomes the MODELD_OWNER marker (containment.py) that every process the
    backend starts inherits; a marker modeld itself inherited is never passed on.
    """
    if not backend.command:
        raise InvalidArgument(f"backend {backend.name!r} has an empty command")
    if backend.max_output_line < MIN_MAX_LINE:
        raise InvalidArgument(
            f"backend {backend.name!r}: max_output_line must be at least {MIN_MAX_LINE}"
        )
    root = models_dir.resolve()
    model_file = str(resolve_model_file(root, spec.model_file)) if spec.model_file else ""
    env = {k: v for k, v in {**base_env, **dict(backend.env)}.items() if k != MARKER}
    if owner:
        env[MARKER] = owner
    if gpu_ids:
        # Indexes are NVML's, which follow PCI bus order; CUDA must number GPUs the same way.
        env["CUDA_DEVICE_ORDER"] = "PCI_BUS_ID"
        env["CUDA_VISIBLE_DEVICES"] = ",".join(str(i) for i in gpu_ids)
    return LaunchPlan(
        command=backend.command,
        model_file=model_file,
        models_dir=str(root),
        python=backend.python or python,
        env=env,
        cwd=backend.workdir or None,
        load=load_options.ModelLoad(
            spec.model_file, model_file, str(root), load_options.parse(spec.name, spec.options)
        ),
    )
