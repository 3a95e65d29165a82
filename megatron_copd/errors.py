"""Errors a user can fix. The CLI prints their message as one line and exits non-zero.

Each message names the file / row / field / key and what was expected.
"""


class UserError(Exception):
    """Base class: bad config, data, checkpoint, layout or command-line input."""


class DataError(UserError):
    """A dataset file or row that cannot be used (message: ``file:line: field: expected ...``)."""


class CheckpointError(UserError):
    """A checkpoint that is missing, incomplete, corrupted or does not fit the model."""
