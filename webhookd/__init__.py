"""webhookd: a durable webhook dispatcher for mail-server events."""

__version__ = "0.1.0"

__all__ = ["__version__"]
