"""Faults the user can fix, as types: each carries the exit code `clipmech` ends with.

A `UserError` is an expected, named fault (a bad value, an unusable checkpoint, a folder in use);
its message is one line naming the thing and the fix, and `clipmech.cli` prints it as
`clipmech: error: <message>` and exits with `exit_code`. Anything that is not a UserError (or one of
the standard faults `clipmech.cli.describe_error` maps: OSError with an errno, ...) is a bug and
keeps its traceback. The classes also derive from the builtin exception that the code raised before
(ValueError, RuntimeError), so existing `except ValueError` callers keep working.

This module imports nothing of clipmech (or torch): every layer may raise these.
"""
from __future__ import annotations

EXIT_ERROR, EXIT_CONFIG, EXIT_BUSY, EXIT_CHECKPOINT, EXIT_IO, EXIT_INTERRUPTED = 1, 2, 3, 4, 5, 130


class UserError(Exception):
    """A fault of the input, not of clipmech: one-line message, exit code 1 (bad input)."""

    exit_code = EXIT_ERROR
    label = ""  # printed before the message ("config: ")


class BadInputError(UserError, ValueError):
    """A file or value the command cannot use (corrupt JSON, missing run, unknown name): exit 1."""


class ConfigError(UserError, ValueError):
    """A configuration or option value of the wrong type, range or name; the message names the key
    and what it must be. Exit 2."""

    exit_code = EXIT_CONFIG
    label = "config: "


class UnitBusyError(UserError, RuntimeError):
    """Another live process holds a unit of work (the message names it). Exit 3."""

    exit_code = EXIT_BUSY


class CheckpointError(UserError, ValueError):
    """A checkpoint / weight file that cannot be used; the message names the file and the cause. Exit 4."""

    exit_code = EXIT_CHECKPOINT


class FileSystemError(UserError, OSError):
    """The file system refused (read-only, full, a file where a folder should be). Exit 5."""

    exit_code = EXIT_IO
