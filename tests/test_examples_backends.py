"""The backend recipes in examples/backends/ are valid modeld configs: each file loads
with the config loader, every model's options type-check, and every command resolves
all its placeholders."""

from pathlib import Path

import pytest

from modeld import config
from modeld.supervisor.launch import plan_launch

EXAMPLES = sorted((Path(__file__).parent.parent / "examples" / "backends").glob("*.toml"))


def test_there_is_a_recipe_for_each_kind_of_backend() -> None:
    assert {p.stem for p in EXAMPLES} == {
        "localai-python",
        "localai-llama-cpp",
        "llama-server",
        "llama-cpp-python",
        "vllm",
    }


# The path each HTTP server really serves while it is up: llama_cpp.server has no
# /health (404), llama-server answers /health 503 while loading, vLLM 200 once up.
HEALTH_PATHS = {"llama-server": "/health", "vllm": "/health", "llama-cpp-python": "/v1/models"}


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_example_loads_and_every_model_can_be_planned(path: Path) -> None:
    cfg = config.load(str(path), env={})
    assert cfg.models, "a recipe defines at least one model"
    for spec in cfg.models.values():
        backend = cfg.backend(spec.backend)
        assert backend is not None
        plan = plan_launch(spec, backend, cfg.models_dir, python="/py", base_env={}, gpu_ids=(0,))
        argv = plan.argv("127.0.0.1", 41000)
        assert not [arg for arg in argv if "{" in arg], argv
        if backend.protocol == "http":
            assert "41000" in argv
            assert backend.health_path == HEALTH_PATHS[path.stem]
            assert plan.model_file in argv
        else:
            assert argv[-2:] == ["--addr", "127.0.0.1:41000"]
        assert plan.env["CUDA_VISIBLE_DEVICES"] == "0"
