"""Fixtures shared by test modules: `pg_dsn` (a fresh PostgreSQL database, see pg.py).

Tests marked `real` (real llama.cpp servers, tests/test_real_servers.py) or `long`
(the slowest process-level scenarios) run only when `-m` names their marker
(`make test-real`, `make test-long`); every other run leaves them out, which keeps
`make test` (and CI) within its time budget.
"""

import pytest

from pg import pg_dsn

__all__ = ["pg_dsn"]


OPT_IN = ("real", "long")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    named = config.getoption("markexpr") or ""
    left_out = [m for m in OPT_IN if m not in named]
    dropped = [i for i in items if any(i.get_closest_marker(m) for m in left_out)]
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = [i for i in items if i not in dropped]
