"""tora: a runtime for tool-integrated reasoning."""

__version__ = "0.1.0"
