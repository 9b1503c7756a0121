"""The package version, in one place: read by the package, the saved-model metadata, the CLI and setup.cfg."""

__version__ = "0.1.0"
