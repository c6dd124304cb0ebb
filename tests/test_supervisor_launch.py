"""What a replica runs: argv placeholders, environment, model file, LoadModel options."""

from pathlib import Path

import pytest

from modeld.errors import InvalidArgument
from modeld.load_options import FIELDS
from modeld.spec import BackendSpec, ModelSpec
from modeld.supervisor.backend_client import model_options
from modeld.supervisor.launch import plan_launch

BACKEND = BackendSpec(
    name="b",
    command=("{python}", "serve", "--addr={addr}", "{model_file}", "{models_dir}", '{"x": 1}'),
    env=(("A", "from-backend"),),
    workdir="/srv",
)


def spec(model_file: str = "sub/m.gguf", **options: str) -> ModelSpec:
    return ModelSpec(name="m", backend="b", model_file=model_file, options=tuple(options.items()))


@pytest.fixture
def models(tmp_path: Path) -> Path:
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "m.gguf").write_bytes(b"")
    return tmp_path


def test_placeholders_expand_and_other_braces_stay(models: Path) -> None:
    plan = plan_launch(spec(), BACKEND, models, python="/py", base_env={"A": "base", "B": "b"})
    root = str(models.resolve())
    assert plan.argv("127.0.0.1", 4000) == [
        "/py",
        "serve",
        "--addr=127.0.0.1:4000",
        f"{root}/sub/m.gguf",
        root,
        '{"x": 1}',
    ]
    assert plan.argv("::1", 4000)[2] == "--addr=[::1]:4000"
    assert plan.env == {"A": "from-backend", "B": "b"}
    assert plan.cwd == "/srv"


def test_python_is_the_backends_own_interpreter_when_it_names_one(models: Path) -> None:
    own = BackendSpec(name="b", command=("{python}", "-m", "srv"), python="/venvs/srv/bin/python")
    plan = plan_launch(spec(), own, models, python="/modeld/python", base_env={})
    assert plan.argv("127.0.0.1", 4000)[0] == "/venvs/srv/bin/python"
    plan = plan_launch(spec(), BACKEND, models, python="/modeld/python", base_env={})
    assert plan.argv("127.0.0.1", 4000)[0] == "/modeld/python"


def test_gpu_ids_set_cuda_visible_devices(models: Path) -> None:
    plan = plan_launch(spec(), BACKEND, models, python="p", base_env={}, gpu_ids=(1, 3))
    assert plan.env["CUDA_VISIBLE_DEVICES"] == "1,3"
    assert (
        "CUDA_VISIBLE_DEVICES"
        not in plan_launch(spec(), BACKEND, models, python="p", base_env={}).env
    )


def test_no_model_file_means_empty_fields(models: Path) -> None:
    plan = plan_launch(spec(model_file=""), BACKEND, models, python="p", base_env={})
    assert plan.model_file == "" and model_options(plan.load).ModelFile == ""


@pytest.mark.parametrize("bad", ["../../etc/passwd", "/etc/passwd", "link/passwd", "sub/../../x"])
def test_model_file_must_stay_inside_models_dir(models: Path, bad: str) -> None:
    (models / "link").symlink_to("/etc")
    with pytest.raises(InvalidArgument):
        plan_launch(spec(model_file=bad), BACKEND, models, python="p", base_env={})


def test_options_map_to_typed_fields_and_the_rest_to_options(models: Path) -> None:
    load = plan_launch(
        spec(
            context_size="4096",
            ngl="33",
            threads="8",
            seed="-1",
            batch="512",
            f16="true",
            mmap="no",
            mlock="1",
            low_vram="off",
            embeddings="yes",
            main_gpu="0",
            tensor_split="0.5,0.5",
            type="llama",
            engine_args="--foo",
            cuda="true",
            gpu_memory_utilization="0.5",
            lora_adapters="a.bin,b.bin",
            lora_scales="0.5, 1",
            max_new_tokens="77",
            attn="a:b",
        ),
        BACKEND,
        models,
        python="p",
        base_env={},
    ).load
    opts = model_options(load)
    root = str(models.resolve())
    assert (opts.Model, opts.ModelFile, opts.ModelPath) == (
        "sub/m.gguf",
        f"{root}/sub/m.gguf",
        root,
    )
    assert (opts.ContextSize, opts.NGPULayers, opts.Threads, opts.Seed, opts.NBatch) == (
        4096,
        33,
        8,
        -1,
        512,
    )
    assert (opts.F16Memory, opts.MMap, opts.MLock, opts.LowVRAM, opts.Embeddings) == (
        True,
        False,
        True,
        False,
        True,
    )
    assert (opts.MainGPU, opts.TensorSplit, opts.Type, opts.EngineArgs) == (
        "0",
        "0.5,0.5",
        "llama",
        "--foo",
    )
    assert (opts.CUDA, opts.GPUMemoryUtilization) == (True, 0.5)
    assert (list(opts.LoraAdapters), list(opts.LoraScales)) == (["a.bin", "b.bin"], [0.5, 1.0])
    # LocalAI's backends split "key:value" on the first ':'.
    assert sorted(opts.Options) == ["attn:a:b", "max_new_tokens:77"]


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("context_size", "big"),
        ("threads", str(2**31)),
        ("f16", "maybe"),
        ("rope_freq_base", "inf"),
        ("lora_scales", "1,two"),
    ],
)
def test_bad_option_values_are_refused(models: Path, key: str, value: str) -> None:
    with pytest.raises(InvalidArgument, match=key):
        plan_launch(spec(**{key: value}), BACKEND, models, python="p", base_env={})


def test_empty_command_is_refused(models: Path) -> None:
    empty = BackendSpec(name="b", command=())
    with pytest.raises(InvalidArgument, match="empty command"):
        plan_launch(spec(), empty, models, python="p", base_env={})


def test_too_short_output_lines_are_refused(models: Path) -> None:
    tiny = BackendSpec(name="b", command=("x",), max_output_line=10)
    with pytest.raises(InvalidArgument, match="max_output_line"):
        plan_launch(spec(), tiny, models, python="p", base_env={})


def test_readme_documents_every_load_option() -> None:
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    missing = [n for n, f in FIELDS.items() if f"`{n}` ({f.name})" not in readme]
    assert missing == []
