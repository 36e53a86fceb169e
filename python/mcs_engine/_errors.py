"""The exceptions of :mod:`mcs_engine` (docs/python.md section 5).

Every error the engine raises is a :class:`McsEngineError`; those about the caller's input or files
are also the built-in exception Python code expects, so ``except ValueError`` and
``except FileNotFoundError`` work as well as ``except McsEngineError``.
"""

from __future__ import annotations

__all__ = ["McsEngineError", "InvalidInputError", "FileError", "MissingFileError"]


class McsEngineError(Exception):
    """Base of every error raised by mcs_engine. Raised as itself for device (CUDA) failures and
    internal errors (a bug: please report it)."""


class InvalidInputError(McsEngineError, ValueError):
    """Invalid input: an image of the wrong type, shape or values, an empty prompt, options out of
    range, more samples than memory holds, a model folder whose files do not fit together, an
    unreadable image file."""


class FileError(McsEngineError, OSError):
    """A file could not be read (``errno`` and ``filename`` say which and why)."""

    def __str__(self) -> str:
        # Raised by the engine with its own message (which names the file) as the only argument:
        # show that message rather than OSError's "[Errno N] None: 'file'" form.
        if len(self.args) == 1:
            return str(self.args[0])
        return super().__str__()


class MissingFileError(FileError, FileNotFoundError):
    """A file or folder does not exist, e.g. a model folder or one of its files
    (``filename`` names it)."""
