"""Fixtures shared by test modules: `pg_dsn` (a fresh PostgreSQL database, see pg.py)."""

from pg import pg_dsn

__all__ = ["pg_dsn"]
