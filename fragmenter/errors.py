"""Errors the fragmenter raises. The CLI turns each into one line on stderr."""

from __future__ import annotations


class FragmenterError(Exception):
    """Base of every error a user can cause with bad input or a bad folder."""


class WriteError(FragmenterError):
    """An output file or folder could not be made (a full or read-only disk, no permission)."""


class GGUFFormatError(FragmenterError):
    """The file is not a GGUF file we can read (bad magic, truncated, bad offsets)."""


class ManifestError(FragmenterError):
    """A manifest is missing, unreadable, or not one we understand."""


class FragmentError(FragmenterError):
    """One or more fragments are missing or do not match the manifest."""


class SplitError(FragmenterError):
    """The parts of a split model (`NAME-0000k-of-0000N.gguf`) are missing or do not belong together."""
