"""The one exception type the command line turns into a one-line error message."""


class OnnxSnpeError(Exception):
    """A problem with the user's input or environment, worded for the user (no traceback)."""


class HtpRefused(OnnxSnpeError):
    """The QNN HTP backend would not finalize the model: a finding about the model, not a failure of
    the run (``quantize --htp`` reports it and writes its outputs)."""


def bad_values(tensor: str, problem: Exception) -> OnnxSnpeError:
    """The error for a tensor whose values the statistics refuse (NaN or Inf)."""
    return OnnxSnpeError(f"tensor '{tensor}' takes {problem} on the calibration data")
