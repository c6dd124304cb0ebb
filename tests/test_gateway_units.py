"""The gateway's pure parts: bearer keys, its config table, the request body's routing fields."""

from pathlib import Path

import pytest

from modeld import config
from modeld.errors import ConfigError
from modeld.gateway.app import parse_body
from modeld.gateway.auth import Keys, read_keys
from modeld.gateway.errors import ApiError
from modeld.gateway.leasing import affinity_key


def test_keys_compare_the_whole_bearer_key(tmp_path: Path) -> None:
    path = tmp_path / "keys"
    path.write_text("alpha\n# beta\nGamma\n")
    keys = Keys(read_keys(str(path)))
    assert keys.allows("Bearer alpha") and keys.allows("bearer Gamma")
    for wrong in (None, "", "alpha", "Bearer alph", "Bearer alphaa", "Bearer beta", "Basic alpha"):
        assert not keys.allows(wrong), wrong
    assert Keys().allows(None)
    path.write_text("# none\n")
    with pytest.raises(ConfigError, match="no key in it"):
        read_keys(str(path))


def test_gateway_settings_are_checked_with_the_key_named() -> None:
    assert config.load(env={"MODELD_GATEWAY_RETRY_AFTER": "3s"}).gateway.retry_after == 3.0
    with pytest.raises(ConfigError, match=r"gateway\.listen"):
        config.load(env={"MODELD_GATEWAY_LISTEN": "8080"})
    with pytest.raises(ConfigError, match=r"gateway\.max_body_bytes"):
        config.load(env={"MODELD_GATEWAY_MAX_BODY_BYTES": "10"})


def test_only_model_and_user_are_read_from_the_body() -> None:
    assert parse_body(b'{"model": "m", "user": "u", "messages": [1, 2]}') == ("m", "u")
    for bad in (b"", b"[]", b'{"model": 3}', b'{"model": ""}', b"\xff"):
        with pytest.raises(ApiError) as caught:
            parse_body(bad)
        assert caught.value.status == 400


def test_the_affinity_key_is_the_session_header_else_the_user() -> None:
    assert affinity_key("s1", "alice") == "s1"
    assert affinity_key(None, "alice") == "alice"
    assert affinity_key("", 42) == ""
