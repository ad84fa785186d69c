"""The package version, in one place (the CLI, run.json and model cards read it)."""

__version__ = "0.1.0"
