"""Run a QDQ model on Qualcomm's HTP backend through onnxruntime-qnn, and measure agreement with it.

onnxruntime-qnn (the optional extra ``onnxsnpe[qnn]``, version 2.x) is a plugin execution provider:
it registers ``QNNExecutionProvider`` with a standard onnxruntime and ships ``libQnnHtp.so``, which
on x86-64 Linux is Qualcomm's HTP emulator. Sessions run with the default
``offload_graph_io_quantization``: the QuantizeLinear of each graph input and the DequantizeLinear
of each graph output run on the CPU, everything else in the HTP graph.

Inputs are fake-quantized with onnxsnpe's own rounding before they reach any runtime: onnxruntime's
CPU QuantizeLinear rounds half to even, SNPE rounds half away from zero, and real inputs do hit exact
ties (``pixel / 127.5 - 1`` lands on one at every odd pixel value with the usual [-1, 1] encoding).
"""

from __future__ import annotations

import importlib
import json
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from ..encode.encoding import Encoding, fake_quantize
from ..errors import HtpRefused, OnnxSnpeError
from ..graph.large import with_model_source
from ..graph.ops import WIDE_WEIGHT_OPS
from ..graph.runtime import make_session

QNN_EP = "QNNExecutionProvider"


QDQ_OPS = frozenset({"QuantizeLinear", "DequantizeLinear"})


HTP_ARCHS = ("68", "69", "73", "75", "79")
"""HTP architectures the emulator can be asked for (onnxruntime-qnn's ``htp_arch``). Measured with
onnxruntime-qnn 2.7.0 on EfficientNet-Lite0 W8A8: the default computes as v68 and v69 do (identical
outputs), v73 and v75 differently (24.2 dB between v68 and v75 on 16 held-out crops). The htp
arithmetic (simulate/htp) was decoded on the default."""
A16W16_ARCH = "73"
"""The architecture sessions ask for by default when the model has a 16-bit weight: HTP runs A16W16
layers from v73 on (SNPE.md section 4), and the emulator refuses a Conv with int16 weights for the
default architecture, v68 and v69 (measured: "was not selected by that EP"; accepted by 73, 75, 79)."""


INSTALL_HINT = "pip install 'onnxsnpe[qnn]' (onnxruntime-qnn 2.x)"


Sample = dict[str, np.ndarray]


Runner = Callable[[Sample], list[np.ndarray]]


def qnn_unavailable_reason() -> str | None:
    """Why the HTP backend cannot run here, or None when it can."""
    try:
        qnn = importlib.import_module("onnxruntime_qnn")
    except ImportError:
        return f"onnxruntime-qnn is not installed: {INSTALL_HINT}"
    if not hasattr(ort, "register_execution_provider_library"):
        return f"onnxruntime {ort.__version__} cannot load plugin execution providers; upgrade it"
    try:
        _qnn_devices(qnn)
    except Exception as exc:  # the plugin library fails to load in many ways
        return f"onnxruntime-qnn is installed but its QNN execution provider does not load: {exc}"
    return None


def _qnn_devices(qnn) -> list:
    """The QNN EP devices, registering the plugin library on first use."""
    devices = [d for d in ort.get_ep_devices() if d.ep_name == QNN_EP]
    if not devices:
        ort.register_execution_provider_library(QNN_EP, qnn.get_library_path())
        devices = [d for d in ort.get_ep_devices() if d.ep_name == QNN_EP]
    if not devices:
        raise RuntimeError("no QNN device was found after registering the library")
    return devices


@dataclass
class HtpSession:
    """An onnxruntime session running a QDQ model on the QNN HTP backend.

    ``arch`` is the HTP architecture (one of HTP_ARCHS) to ask for; None asks for none (the
    backend's default) unless the model has a 16-bit weight, which then asks for A16W16_ARCH.
    ``cpu_nodes`` lists (op type, node name) of the compute nodes that fell back to onnxruntime's
    CPU provider, ``io_nodes`` the QuantizeLinear/DequantizeLinear nodes it runs there (by design
    the graph input and output conversions; the QNN provider renames the ones it moves). Both are
    None when this onnxruntime cannot report node placement. ``float_nodes`` lists (QNN op type,
    QNN node name) of the ops the HTP computes in float (_float_nodes).
    """

    model: onnx.ModelProto
    input_encodings: dict[str, Encoding]
    arch: str | None = None
    session: ort.InferenceSession = field(init=False)
    float_nodes: list[tuple[str, str]] = field(init=False)
    cpu_nodes: list[tuple[str, str]] | None = field(init=False)
    io_nodes: list[tuple[str, str]] | None = field(init=False)

    def __post_init__(self) -> None:
        reason = qnn_unavailable_reason()
        if reason:
            raise OnnxSnpeError(reason)
        qnn = importlib.import_module("onnxruntime_qnn")
        options = ort.SessionOptions()
        options.log_severity_level = 3
        options.add_session_config_entry("session.record_ep_graph_assignment_info", "1")
        if self.arch is None and has_16_bit_weights(self.model):
            self.arch = A16W16_ARCH
        provider = {"backend_path": qnn.get_qnn_htp_path(), **({"htp_arch": self.arch} if self.arch else {})}
        with tempfile.TemporaryDirectory() as folder:  # the QNN graph the provider builds, as JSON
            provider.update(dump_json_qnn_graph="1", json_qnn_graph_dir=folder)
            options.add_provider_for_devices(_qnn_devices(qnn), provider)
            try:
                self.session = with_model_source(self.model, lambda source: ort.InferenceSession(source, options))
            except Exception as exc:
                hint = ""
                if self.arch in (None, "68", "69") and has_16_bit_weights(self.model):
                    hint = f" (a 16-bit weight needs HTP v{A16W16_ARCH} or later: --htp-arch {A16W16_ARCH})"
                raise HtpRefused(f"the QNN HTP backend rejected the model{hint}: {_first_line(exc)}") from exc
            self.float_nodes = _float_nodes(Path(folder))
        self.cpu_nodes = self.io_nodes = None
        if hasattr(self.session, "get_provider_graph_assignment_info"):
            cpu = [
                (node.op_type, node.name)
                for subgraph in self.session.get_provider_graph_assignment_info()
                if subgraph.ep_name != QNN_EP
                for node in subgraph.get_nodes()
            ]
            self.cpu_nodes = [n for n in cpu if n[0] not in QDQ_OPS]
            self.io_nodes = [n for n in cpu if n[0] in QDQ_OPS]

    @property
    def output_names(self) -> list[str]:
        return [o.name for o in self.session.get_outputs()]

    def run(self, sample: Sample) -> list[np.ndarray]:
        """The HTP outputs for one sample (inputs fake-quantized first, see the module docstring)."""
        return self.session.run(None, quantize_inputs(sample, self.input_encodings))


QNN_FLOAT_TYPES = {0x0216: "float16", 0x0232: "float32"}
"""QNN's data type codes of float tensors (QnnTypes.h)."""
MOVING_OPS = frozenset({"Dequantize", "Quantize", "Transpose", "Reshape"})
"""QNN ops that only convert or move data: the edges of a float island, not its computation."""


def _float_nodes(folder: Path) -> list[tuple[str, str]]:
    """(QNN op type, node name) of every op the HTP computes in float, from the provider's JSON dump of
    its QNN graphs in ``folder``: it hands an op whose quantized inputs and output differ in bitwidth
    to the HTP as Dequantize, the op in float, Quantize (tools/HTP.md finding 32)."""
    found = []
    for path in sorted(folder.glob("*.json")):
        graph = json.loads(path.read_text())
        if "graph" not in graph:  # the tensor log beside each graph
            continue
        tensors, nodes = graph["graph"]["tensors"], graph["graph"]["nodes"]
        found += [(node["type"], name) for name, node in nodes.items() if node["type"] not in MOVING_OPS
                  and any(tensors[out]["data_type"] in QNN_FLOAT_TYPES for out in node["output_names"])]
    return sorted(found)


def has_16_bit_weights(qdq: onnx.ModelProto) -> bool:
    """Whether a Conv, ConvTranspose, Gemm, MatMul or LayerNormalization of ``qdq`` reads a 16-bit
    constant tensor through its DequantizeLinear (a weight or gamma, not a zero point): such a kernel
    needs v73. The 16-bit constant of an elementwise op does not; the default architecture runs those."""
    wide = {init.name for init in qdq.graph.initializer
            if init.data_type in (onnx.TensorProto.INT16, onnx.TensorProto.UINT16)}
    dequantized = {node.output[0] for node in qdq.graph.node
                   if node.op_type == "DequantizeLinear" and node.input[0] in wide}
    return any(node.op_type in WIDE_WEIGHT_OPS and any(name in dequantized for name in node.input)
               for node in qdq.graph.node)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]


def quantize_inputs(sample: Sample, encodings: dict[str, Encoding]) -> Sample:
    """``sample`` with each encoded input fake-quantized (rounding half away from zero)."""
    return {name: fake_quantize(value, encodings[name]) if name in encodings else value
            for name, value in sample.items()}


def cpu_runner(model: onnx.ModelProto, input_encodings: dict[str, Encoding], names: list[str]) -> Runner:
    """onnxruntime's own CPU execution of ``model`` (all graph optimizations on, as a user gets it)."""
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = with_model_source(model, lambda source: ort.InferenceSession(
        source, sess_options=options, providers=["CPUExecutionProvider"]))
    return lambda sample: session.run(names, quantize_inputs(sample, input_encodings))


def simulation_runner(model: onnx.ModelProto, output_map: dict[str, str], names: list[str]) -> Runner:
    """A runner over a simulation model (fake_quant.build_simulation_model or htp.model.htp_simulation_model)."""
    session = make_session(model)
    mapped = [output_map[name] for name in names]
    return lambda sample: session.run(mapped, sample)
