"""webhookd: a durable webhook dispatcher for mail-server events."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("webhookd")
except PackageNotFoundError:  # running from a source tree without installation
    __version__ = "0.0.0"

__all__ = ["__version__"]
