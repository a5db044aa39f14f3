"""Choose how the simulation computes: the HTP's measured integer arithmetic or exact float math."""

from __future__ import annotations

import onnx

from ..encode.encoding import Encoding, ParamEncoding
from ..graph.targets import QuantTargets
from .fake_quant import build_simulation_model
from .htp.model import htp_simulation_model

ARITHMETICS = ("htp", "htp-v73", "exact")
"""How the simulation computes: like Qualcomm's HTP as the emulator does by default (v68's
arithmetic, v73's when a Conv/Gemm/MatMul weight is 16-bit), like HTP v73 and later (whose 8-bit
convolutions requantize differently), or exact float with exact rounding."""


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
    if arithmetic == "exact":
        return build_simulation_model(deploy, targets, activations, params)
    return htp_simulation_model(deploy, targets, activations, params, "73" if arithmetic == "htp-v73" else None)


def htp_arithmetic(arch: str | None) -> str:
    """The HTP arithmetic of an emulator computing as ``arch`` (None: its default, see ARITHMETICS)."""
    return "htp-v73" if arch is not None and int(arch) >= 73 else "htp"
