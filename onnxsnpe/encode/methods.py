"""The range methods by name, and the check of a method setting (light: the CLI parser reads it)."""

from __future__ import annotations

from ..errors import OnnxSnpeError

ACTIVATION_METHODS = ("minmax", "percentile", "mse", "tf_enhanced")
WEIGHT_METHODS = ACTIVATION_METHODS
DEFAULT_PERCENTILE = 99.99


def check_method(method: str, percentile: float = DEFAULT_PERCENTILE, flag: str = "--method") -> None:
    """Raise OnnxSnpeError for an unknown method or a percentile outside [50, 100]."""
    if method not in ACTIVATION_METHODS:
        raise OnnxSnpeError(f"unknown {flag} '{method}'; choose from {', '.join(ACTIVATION_METHODS)}")
    if method == "percentile" and not 50.0 <= percentile <= 100.0:
        raise OnnxSnpeError(f"--percentile must be between 50 and 100, got {percentile}")
