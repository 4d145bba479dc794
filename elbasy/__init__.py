"""elbasy: an egress proxy that keeps API clients under their rate limits."""

__version__ = "0.1.0"
__all__ = ["__version__"]
