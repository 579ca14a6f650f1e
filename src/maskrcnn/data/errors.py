"""The one error type the data package raises for bad input data."""

from __future__ import annotations


class DatasetError(ValueError):
    """A dataset file (annotation JSON, image, label file) is missing, unreadable or malformed.

    Messages name the file and, where they apply, the image id and annotation id, and say what
    is wrong, so that a user can fix the data without a debugger.
    """
