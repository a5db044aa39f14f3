"""Choose how the simulation computes: the HTP's measured integer arithmetic or exact float math."""

from __future__ import annotations

import onnx

from ..encode.encoding import Encoding, ParamEncoding
from ..graph.targets import QuantTargets
from .fake_quant import build_simulation_model
from .htp.model import htp_simulation_model

ARITHMETICS = ("htp", "exact")
"""How the simulation computes: like Qualcomm's HTP (default), or exact float with exact rounding."""


def simulation_model(
    deploy: onnx.ModelProto,
    targets: QuantTargets,
    activations: dict[str, Encoding],
    params: dict[str, ParamEncoding],
    arithmetic: str = "htp",
) -> tuple[onnx.ModelProto, dict[str, str]]:
    """The simulated quantized model in the given arithmetic, and the map to its tensors' names."""
    if arithmetic not in ARITHMETICS:
        raise ValueError(f"unknown arithmetic {arithmetic!r}")
    build = htp_simulation_model if arithmetic == "htp" else build_simulation_model
    return build(deploy, targets, activations, params)
