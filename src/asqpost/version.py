"""The package version, read from the installed distribution's metadata: pyproject.toml is the only place it
is written."""

from importlib.metadata import PackageNotFoundError, version

DISTRIBUTION = "asq-post"
UNKNOWN = "0+unknown"  # a source tree on sys.path that was never installed (pip install -e . fixes it)

try:
    __version__ = version(DISTRIBUTION)
except PackageNotFoundError:
    __version__ = UNKNOWN
