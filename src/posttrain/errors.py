"""The errors posttrain reports to a user as one line (the CLI prints them without a traceback).

Layers raise their own subclasses of ValueError / RuntimeError (`DataError`, `ModelLoadError`,
`ConfigError`, ...); the CLI treats these user-facing kinds alike.
"""

from __future__ import annotations


class PosttrainError(Exception):
    """Base of errors that describe bad input or configuration, not a bug."""
