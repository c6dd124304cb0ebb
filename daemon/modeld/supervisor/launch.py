"""What a replica will run, decided before anything is spawned (pure: no I/O but path checks).

Everything that can be wrong with a model spec or a backend entry (a model file
outside models_dir, a load option that is not a number) is found here, so a bad
request fails with InvalidArgument and never starts a process.
"""

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from modeld._proto.backend import backend_pb2 as pb
from modeld.errors import InvalidArgument
from modeld.ops.logstore import MIN_MAX_LINE
from modeld.spec import BackendSpec, ModelSpec, resolve_model_file
from modeld.supervisor.backend_client import host_port
from modeld.supervisor.sweep import MARKER

_PLACEHOLDER = re.compile(r"\{(addr|host|port|model_file|models_dir|python)\}")
_INT32 = (-(2**31), 2**31 - 1)

# Spec option names (LocalAI's YAML spellings) → ModelOptions fields.
INT_OPTIONS = {
    "context_size": "ContextSize",
    "gpu_layers": "NGPULayers",
    "ngl": "NGPULayers",
    "threads": "Threads",
    "seed": "Seed",
    "batch": "NBatch",
}
BOOL_OPTIONS = {
    "f16": "F16Memory",
    "mmap": "MMap",
    "mlock": "MLock",
    "low_vram": "LowVRAM",
    "embeddings": "Embeddings",
}
STR_OPTIONS = {
    "main_gpu": "MainGPU",
    "tensor_split": "TensorSplit",
    "type": "Type",
    "engine_args": "EngineArgs",
}
_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off"})


@dataclass(frozen=True)
class LaunchPlan:
    """Everything about starting one replica except the port, which each attempt picks."""

    command: tuple[str, ...]
    model_file: str  # absolute and inside models_dir, or "" when the spec names none
    models_dir: str
    python: str
    env: Mapping[str, str]
    cwd: str | None
    load_options: pb.ModelOptions

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
        python=python,
        env=env,
        cwd=backend.workdir or None,
        load_options=model_options(spec, model_file, str(root)),
    )


def model_options(spec: ModelSpec, model_file: str, models_dir: str) -> pb.ModelOptions:
    """LoadModel's request: known options as typed fields, the rest as "key=value" entries."""
    opts = pb.ModelOptions(Model=spec.model_file, ModelFile=model_file, ModelPath=models_dir)
    extra: list[str] = []
    for key, value in spec.options:
        if key in INT_OPTIONS:
            setattr(opts, INT_OPTIONS[key], _int32(spec.name, key, value))
        elif key in BOOL_OPTIONS:
            setattr(opts, BOOL_OPTIONS[key], _bool(spec.name, key, value))
        elif key in STR_OPTIONS:
            setattr(opts, STR_OPTIONS[key], value)
        else:
            extra.append(f"{key}={value}")
    opts.Options.extend(extra)
    return opts


def _int32(model: str, key: str, value: str) -> int:
    try:
        number = int(value.strip())
    except ValueError:
        raise InvalidArgument(f"model {model!r}: option {key} must be a whole number") from None
    if not _INT32[0] <= number <= _INT32[1]:
        raise InvalidArgument(f"model {model!r}: option {key} is out of range")
    return number


def _bool(model: str, key: str, value: str) -> bool:
    word = value.strip().lower()
    if word in _TRUE:
        return True
    if word in _FALSE:
        return False
    raise InvalidArgument(f"model {model!r}: option {key} must be true or false, not {value!r}")
