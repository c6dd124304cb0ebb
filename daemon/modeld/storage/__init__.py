"""Storage: the SQLite registry (the only code that touches it), the catalog and settings."""
