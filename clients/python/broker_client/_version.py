"""The package version, kept in step with clients/python/pyproject.toml (a test checks)."""

__version__ = "0.1.0"
