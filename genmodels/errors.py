"""The one error type for user mistakes.

A ``GenmodelsError`` means the user gave something wrong (a config field, a file, a shape);
its message is one line that names the field, file or shape. The CLI prints it as
``genmodels: error: ...`` without a traceback. Programming errors are any other exception
and keep their traceback.
"""
from __future__ import annotations


class GenmodelsError(ValueError):
    """A user mistake, reported as one line naming the field, file or shape.

    Subclasses ``ValueError`` so code that already catches ``ValueError`` for bad arguments
    keeps working.
    """
