"""Alembic migrations for every table in ``big5core.models.Base.metadata``."""
