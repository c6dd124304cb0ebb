"""A model spec's `options` → LoadModel's ModelOptions (pure: no I/O).

A documented name (LocalAI's model-config spelling where it has one) sets a typed
ModelOptions field; its value is checked against the field's type, so a bad value
fails with InvalidArgument naming the option before any process starts. Every
other option is passed on in `Options` as "key:value", the format LocalAI's
backends parse (they split on the first ':' and skip entries without one).
"""

import math
from collections.abc import Iterable
from enum import StrEnum
from typing import NamedTuple

from modeld.errors import InvalidArgument


class Kind(StrEnum):
    INT32 = "int32"
    FLOAT = "float"
    BOOL = "bool"
    STRING = "string"
    STRINGS = "repeated string"
    FLOATS = "repeated float"


class Field(NamedTuple):
    name: str  # the ModelOptions field
    kind: Kind


INT, F, B, S = Kind.INT32, Kind.FLOAT, Kind.BOOL, Kind.STRING

# option name → ModelOptions field. README "Load options" lists the same table.
FIELDS: dict[str, Field] = {
    "context_size": Field("ContextSize", INT),
    "seed": Field("Seed", INT),
    "batch": Field("NBatch", INT),
    "f16": Field("F16Memory", B),
    "mmlock": Field("MLock", B),
    "mlock": Field("MLock", B),
    "mmap": Field("MMap", B),
    "vocab_only": Field("VocabOnly", B),
    "low_vram": Field("LowVRAM", B),
    "embeddings": Field("Embeddings", B),
    "numa": Field("NUMA", B),
    "gpu_layers": Field("NGPULayers", INT),
    "ngl": Field("NGPULayers", INT),
    "main_gpu": Field("MainGPU", S),
    "tensor_split": Field("TensorSplit", S),
    "threads": Field("Threads", INT),
    "rope_freq_base": Field("RopeFreqBase", F),
    "rope_freq_scale": Field("RopeFreqScale", F),
    "rms_norm_eps": Field("RMSNormEps", F),
    "ngqa": Field("NGQA", INT),
    "pipeline_type": Field("PipelineType", S),
    "scheduler_type": Field("SchedulerType", S),
    "cuda": Field("CUDA", B),
    "cfg_scale": Field("CFGScale", F),
    "img2img": Field("IMG2IMG", B),
    "clip_model": Field("CLIPModel", S),
    "clip_subfolder": Field("CLIPSubfolder", S),
    "clip_skip": Field("CLIPSkip", INT),
    "control_net": Field("ControlNet", S),
    "tokenizer": Field("Tokenizer", S),
    "lora_base": Field("LoraBase", S),
    "lora_adapter": Field("LoraAdapter", S),
    "lora_scale": Field("LoraScale", F),
    "no_mulmatq": Field("NoMulMatQ", B),
    "draft_model": Field("DraftModel", S),
    "audio_path": Field("AudioPath", S),
    "quantization": Field("Quantization", S),
    "gpu_memory_utilization": Field("GPUMemoryUtilization", F),
    "trust_remote_code": Field("TrustRemoteCode", B),
    "enforce_eager": Field("EnforceEager", B),
    "swap_space": Field("SwapSpace", INT),
    "max_model_len": Field("MaxModelLen", INT),
    "tensor_parallel_size": Field("TensorParallelSize", INT),
    "load_format": Field("LoadFormat", S),
    "disable_log_stats": Field("DisableLogStatus", B),
    "dtype": Field("DType", S),
    "limit_image_per_prompt": Field("LimitImagePerPrompt", INT),
    "limit_video_per_prompt": Field("LimitVideoPerPrompt", INT),
    "limit_audio_per_prompt": Field("LimitAudioPerPrompt", INT),
    "mmproj": Field("MMProj", S),
    "rope_scaling": Field("RopeScaling", S),
    "yarn_ext_factor": Field("YarnExtFactor", F),
    "yarn_attn_factor": Field("YarnAttnFactor", F),
    "yarn_beta_fast": Field("YarnBetaFast", F),
    "yarn_beta_slow": Field("YarnBetaSlow", F),
    "type": Field("Type", S),
    "flash_attention": Field("FlashAttention", S),
    "no_kv_offloading": Field("NoKVOffload", B),
    "lora_adapters": Field("LoraAdapters", Kind.STRINGS),
    "lora_scales": Field("LoraScales", Kind.FLOATS),
    "cache_type_k": Field("CacheTypeKey", S),
    "cache_type_v": Field("CacheTypeValue", S),
    "reranking": Field("Reranking", B),
    "overrides": Field("Overrides", Kind.STRINGS),
    "engine_args": Field("EngineArgs", S),
    "enable_score": Field("EnableScore", B),
}

_INT32 = (-(2**31), 2**31 - 1)
_FLOAT32_MAX = 3.4028234663852886e38
_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off"})

Value = int | float | bool | str | list[str] | list[float]


class LoadOptions(NamedTuple):
    typed: dict[str, Value]  # ModelOptions field → value
    extra: list[str]  # "key:value" entries for ModelOptions.Options


class ModelLoad(NamedTuple):
    """What LoadModel asks a backend to load (the backend client puts it in protobuf)."""

    model: str  # the spec's model_file, as written
    model_file: str  # resolved: absolute and inside models_dir, or ""
    models_dir: str
    options: LoadOptions


def parse(model: str, options: Iterable[tuple[str, str]]) -> LoadOptions:
    """Split and type-check a spec's options; raises InvalidArgument naming the option."""
    typed: dict[str, Value] = {}
    extra: list[str] = []
    for key, value in options:
        field = FIELDS.get(key)
        if field is None:
            extra.append(f"{key}:{value}")
            continue
        try:
            typed[field.name] = convert(field.kind, value)
        except ValueError as exc:
            raise InvalidArgument(
                f"model {model!r}: option {key} ({field.kind.value}) {exc}, got {value[:80]!r}"
            ) from None
    return LoadOptions(typed, extra)


def convert(kind: Kind, value: str) -> Value:
    """`value` as `kind`; raises ValueError saying what was expected."""
    if kind is Kind.INT32:
        return _int32(value)
    if kind is Kind.FLOAT:
        return _float(value)
    if kind is Kind.BOOL:
        return _bool(value)
    if kind is Kind.STRINGS:
        return _items(value)
    if kind is Kind.FLOATS:
        return [_float(item) for item in _items(value)]
    return value


def _int32(value: str) -> int:
    try:
        number = int(value.strip())
    except ValueError:
        raise ValueError("must be a whole number") from None
    if not _INT32[0] <= number <= _INT32[1]:
        raise ValueError("is out of the int32 range")
    return number


def _float(value: str) -> float:
    try:
        number = float(value.strip())
    except ValueError:
        raise ValueError("must be a number") from None
    if not math.isfinite(number) or abs(number) > _FLOAT32_MAX:
        raise ValueError("must be a finite float32")
    return number


def _bool(value: str) -> bool:
    word = value.strip().lower()
    if word in _TRUE:
        return True
    if word in _FALSE:
        return False
    raise ValueError("must be true or false")


def _items(value: str) -> list[str]:
    """A comma-separated list; empty items are dropped."""
    return [item.strip() for item in value.split(",") if item.strip()]
