"""Typed errors raised by the engine, and the one table that maps them to exit codes.

Engine code raises these and never prints or exits; `cli/app.py` catches `LccError`, prints
`lcc: error: <message>` (plus an optional hint) and exits with `exit_code`.
"""

from __future__ import annotations

# The exit-code table. CI scripts may depend on these numbers: never renumber.
EXIT_UNEXPECTED = 1
EXIT_USAGE = 2
EXIT_INPUT = 3
EXIT_MODEL = 4
EXIT_CARTRIDGE = 5
EXIT_MODEL_MISMATCH = 6
EXIT_VERIFY_FAILED = 7
EXIT_RESOURCES = 8
EXIT_EXISTS = 9
EXIT_PARTIAL = 10
EXIT_INTERRUPTED = 130


class LccError(Exception):
    """Base class: a one-line message for the user and an optional hint."""

    exit_code = EXIT_UNEXPECTED

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint


class UsageError(LccError):
    """A flag or argument value that cannot work (ratio out of range, bad path...).

    `field` names the setting (a config field such as `ratio`); the CLI shows it as the flag
    the user typed (`--ratio`), so engine code never needs to know flag names."""

    exit_code = EXIT_USAGE

    def __init__(self, message: str, hint: str | None = None, field: str | None = None):
        super().__init__(message, hint)
        self.field = field


class WindowError(UsageError):
    """A prompt (with its answer) that would run past the model's position window."""


class InputError(LccError):
    """The source document cannot be read or holds no usable text."""

    exit_code = EXIT_INPUT


class ModelError(LccError):
    """The base model cannot be found or loaded."""

    exit_code = EXIT_MODEL


class CartridgeError(LccError):
    """A .lcc file is unreadable, truncated, tampered with or of an unknown version."""

    exit_code = EXIT_CARTRIDGE


class CompilerFileError(LccError):
    """A pretrained-compiler file is unreadable, damaged or of an unknown version."""

    exit_code = EXIT_CARTRIDGE


class ModelMismatchError(LccError):
    """A cartridge was compiled for a different base model than the one loaded."""

    exit_code = EXIT_MODEL_MISMATCH


class VerifyFailed(LccError):
    """`lcc verify` ran and at least one check failed."""

    exit_code = EXIT_VERIFY_FAILED


class ResourceError(LccError):
    """Out of memory or disk space."""

    exit_code = EXIT_RESOURCES


class OutputExistsError(LccError):
    """The output file exists and --force was not given."""

    exit_code = EXIT_EXISTS


class Interrupted(LccError):
    """Ctrl-C; work that can be resumed is kept and the message says where."""

    exit_code = EXIT_INTERRUPTED


EXIT_CODES = {
    EXIT_UNEXPECTED: "unexpected error",
    EXIT_USAGE: "usage: bad flag or argument value",
    EXIT_INPUT: "bad input document",
    EXIT_MODEL: "model cannot be loaded",
    EXIT_CARTRIDGE: "cartridge (or compiler file) format error or corruption",
    EXIT_MODEL_MISMATCH: "cartridge made for another model",
    EXIT_VERIFY_FAILED: "verify found a failed check",
    EXIT_RESOURCES: "out of memory or disk",
    EXIT_EXISTS: "output exists (use --force)",
    EXIT_PARTIAL: "batch compile finished, but some documents failed (see the summary)",
    EXIT_INTERRUPTED: "interrupted",
}
