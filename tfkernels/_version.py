"""The package version, read by setup.py (a regular expression over this file) and re-exported as ``tk.__version__``."""

__version__ = "0.1.0"
