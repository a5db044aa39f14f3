"""The one exception type the command line turns into a one-line error message."""


class OnnxSnpeError(Exception):
    """A problem with the user's input or environment, worded for the user (no traceback)."""
