"""Fixtures shared by test modules: `pg_dsn` (a fresh PostgreSQL database, see pg.py).

Tests marked `real` (real llama.cpp servers, tests/test_real_servers.py) run only when
`-m` names them (`make test-real`); every other run leaves them out.
"""

import pytest

from pg import pg_dsn

__all__ = ["pg_dsn"]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if "real" in (config.getoption("markexpr") or ""):
        return
    real = [item for item in items if item.get_closest_marker("real")]
    if real:
        config.hook.pytest_deselected(items=real)
        items[:] = [item for item in items if not item.get_closest_marker("real")]
