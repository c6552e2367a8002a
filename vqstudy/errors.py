"""The one error type bad input raises, kept in a module of its own so that every layer
(config, quantizers, data, study files, the driver) can raise it without importing any other.

The CLI turns it into one line on stderr and exit code 2; the message names the file or
key and what is allowed.
"""
from __future__ import annotations


class ConfigError(ValueError):
    """Bad configuration: the message names the key and what is allowed, in one line."""
