"""Config: one frozen object from defaults, file, env and flags; bad input exits 2 with one line."""

import subprocess
import sys
from pathlib import Path

import pytest

from modeld import config
from modeld.errors import ConfigError
from modeld.units import parse_duration, parse_size


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "c.toml"
    path.write_text(text)
    return str(path)


def test_defaults_hold_the_demo_catalog() -> None:
    cfg = config.load(None, env={})
    assert cfg.listen == ("127.0.0.1:50051",)
    assert cfg.db_path == Path("var/modeld.db")
    assert cfg.models_dir == Path("var/models")
    assert "echo" in cfg.backends and cfg.models["echo"].backend == "echo"


def test_layers_file_then_env_then_flags(tmp_path: Path) -> None:
    path = write(
        tmp_path, 'log_level = "warning"\n[watchdog]\nmax_loaded = 2\nidle_timeout = "5m"\n'
    )
    env = {"MODELD_WATCHDOG_MAX_LOADED": "3", "MODELD_LOG_LEVEL": "error"}
    cfg = config.load(path, env=env, overrides={"log_level": "debug"})
    assert cfg.settings.max_loaded == 3
    assert cfg.settings.idle_timeout == 300.0
    assert cfg.log_level == "debug"


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("[watchdog]\nmax_lodaed = 3\n", "unknown key 'watchdog.max_lodaed'"),
        ("[watchdog]\nmax_loaded = 'x'\n", "watchdog.max_loaded"),
        ("bogus = 1\n", "unknown key 'bogus'"),
        ("[watchdog]\nidle_timeout = '5 parsecs'\n", "watchdog.idle_timeout"),
        ("[watchdog]\nmemory_threshold = 1.5\n", "memory_threshold"),
        ("[backends.b]\ncommand = []\n", "backends.b.command"),
        ('[backends.b]\ncommand = ["x"]\nprotocl = "grpc"\n', "unknown key 'backends.b.protocl'"),
        ('[backends.b]\ncommand = ["x"]\n[models.m]\nbackend = "nope"\n', "models.m"),
        ('[backends.b]\ncommand = ["x"]\n[models.m]\nbackend = "b"\nmodel_file = "../x"\n', "'..'"),
        (
            '[backends.b]\ncommand = ["x"]\n[models.m]\nbackend = "b"\n'
            'options = { cuda = "maybe" }\n',
            "models.m: model 'm': option cuda (bool)",
        ),
        ('[backends.b]\ncommand = ["x"]\ncrash_loop_window = "2d"\n', "crash_loop_window"),
        ("listen = 5\n", "listen"),
        ("this is not toml", "invalid TOML"),
        (
            '[backends.b]\ncommand = ["x"]\n[models.m]\nbackend = "b"\nplacement = "pack"\n',
            "models.m.placement: expected one of spread, binpack",
        ),
        (
            '[backends.b]\ncommand = ["x"]\n[models.m]\nbackend = "b"\nhost_labels = "gpu"\n',
            "models.m.host_labels: expected a table",
        ),
        (
            '[backends.b]\ncommand = ["x"]\n[models.m]\nbackend = "b"\n'
            'host_labels = { gpu = "h 100" }\n',
            "models.m: model 'm': host_labels: 'h 100'",
        ),
        ('[cluster]\ndsn = "postgresql://x/y"\nplacement = "fill"\n', "cluster.placement"),
        ('[backends.b]\ncommand = ["x"]\nload_metrics = "vllm"\n', "only an http backend"),
        (
            '[backends.b]\ncommand = ["x"]\nprotocol = "http"\nload_metrics = "tgi"\n',
            "backends.b.load_metrics: expected one of vllm, sglang, llamacpp, none",
        ),
        ('[backends.b]\ncommand = ["x"]\nmetrics_path = "metrics"\n', "must start with '/'"),
        ('[backends.b]\ncommand = ["x"]\nload_interval = "1ms"\n', "load_interval"),
        ('[backends.b]\ncommand = ["x"]\nsaturation_waiting = -1\n', "saturation_waiting"),
        ("[routing]\naffinity_slack = 0.5\n", "affinity_slack must be between 1 and 100"),
        (
            '[backends.b]\ncommand = ["{python}"]\npython = "venv/bin/python"\n',
            "backends.b.python: must be an absolute",
        ),
    ],
)
def test_bad_config_names_the_key(tmp_path: Path, text: str, needle: str) -> None:
    with pytest.raises(ConfigError, match=None) as info:
        config.load(write(tmp_path, text), env={})
    assert needle in str(info.value)
    assert "\n" not in str(info.value)


def test_unknown_env_var_is_rejected() -> None:
    with pytest.raises(ConfigError, match="MODELD_MAX_LODED"):
        config.load(None, env={"MODELD_MAX_LODED": "3"})


def test_client_env_vars_are_not_config() -> None:
    assert config.load(None, env={"MODELD_ADDR": "x:1"}).listen == ("127.0.0.1:50051",)


def test_aliases_map_to_one_backend(tmp_path: Path) -> None:
    text = (
        '[backends.llama]\ncommand = ["x"]\naliases = ["llama-cpp"]\n'
        '[models.m]\nbackend = "llama-cpp"\n'
    )
    cfg = config.load(write(tmp_path, text), env={})
    assert cfg.models["m"].backend == "llama"
    assert cfg.backend("llama-cpp") is cfg.backends["llama"]


def test_placement_fields_parse_and_show(tmp_path: Path) -> None:
    text = (
        '[backends.b]\ncommand = ["x"]\n'
        '[models.m]\nbackend = "b"\nhost_labels = { gpu = "h100", nvlink = true }\n'
        'placement = "BinPack"\n[models.n]\nbackend = "b"\n'
        '[cluster]\ndsn = "postgresql://x/y"\nadvertise = "10.0.0.1:1"\n'
    )
    cfg = config.load(write(tmp_path, text), env={})
    m, n = cfg.models["m"], cfg.models["n"]
    assert m.host_labels == (("gpu", "h100"), ("nvlink", "true"))
    assert (m.placement, n.placement, n.host_labels) == ("binpack", "", ())
    assert cfg.cluster is not None and cfg.cluster.placement == "spread"
    shown = cfg.to_dict()
    assert shown["models"]["m"]["host_labels"] == {"gpu": "h100", "nvlink": "true"}
    assert shown["models"]["m"]["placement"] == "binpack"
    assert shown["cluster"]["placement"] == "spread"
    env = {"MODELD_CLUSTER_PLACEMENT": "binpack"}
    binpack = config.load(write(tmp_path, text), env=env).cluster
    assert binpack is not None and binpack.placement == "binpack"


def test_units() -> None:
    assert parse_duration("500ms") == 0.5
    assert parse_duration("1h") == 3600
    assert parse_duration(7) == 7.0
    assert parse_size("8GiB") == 8 << 30
    with pytest.raises(ValueError, match="duration"):
        parse_duration("-1s")


@pytest.mark.parametrize("text", ["[watchdog]\nmax_lodaed = 3\n", "[watchdog]\nmax_loaded = 'x'\n"])
def test_serve_exits_2_with_one_line(tmp_path: Path, text: str) -> None:
    path = write(tmp_path, text)
    result = subprocess.run(
        [sys.executable, "-m", "modeld.cli.main", "serve", "--config", path],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "watchdog.max_lo" in lines[0]


def test_config_show_prints_effective_config(tmp_path: Path) -> None:
    path = write(tmp_path, "[watchdog]\nmax_loaded = 4\n")
    result = subprocess.run(
        [sys.executable, "-m", "modeld.cli.main", "config", "show", "--config", path],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert '"max_loaded": 4' in result.stdout
