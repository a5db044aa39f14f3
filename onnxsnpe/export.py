"""Write what SNPE needs: overrides JSON, input list with raw files, deploy ONNX, report.

Outputs are staged in a hidden folder beside the destination and moved into place only when all
of them were written, so a failed run leaves no partial output.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path

import numpy as np
import onnx

from .data.datasets import to_snpe_layout
from .encode.encoding import ChannelEncodings, Encoding, ParamEncoding
from .errors import OnnxSnpeError
from .graph.large import save_model

OVERRIDES_FILE = "snpe_clip_ranges.json"
DEPLOY_FILE = "snpe_deploy.onnx"
QDQ_FILE = "snpe_qdq.onnx"
INPUT_LIST_FILE = "data.txt"
RAW_DIR = "raw"
REPORT_FILE = "report.json"
HTML_REPORT_FILE = "report.html"


class StagedOutput:
    """A destination folder whose files are written to a staging folder, then published at once."""

    def __init__(self, destination: str | os.PathLike) -> None:
        self.destination = Path(destination).absolute()
        if self.destination.exists() and not self.destination.is_dir():
            raise OnnxSnpeError(f"output path is a file, not a folder: {self.destination}")
        parent = self.destination.parent
        try:
            parent.mkdir(parents=True, exist_ok=True)
            self.staging = Path(tempfile.mkdtemp(prefix=f".{self.destination.name}.tmp-", dir=parent))
        except OSError as exc:
            raise OnnxSnpeError(
                f"cannot write the output folder {self.destination}: {exc.strerror or exc}"
            ) from exc

    def stage(self, name: str) -> Path:
        """Where to write ``name`` now."""
        return self.staging / name

    def final(self, name: str) -> Path:
        """Where ``name`` will be after :meth:`publish` (for paths written into files)."""
        return self.destination / name

    def publish(self) -> None:
        """Move every staged file into the destination."""
        if not self.destination.exists():
            os.rename(self.staging, self.destination)
            return
        for item in sorted(self.staging.iterdir()):
            target = self.destination / item.name
            if item.is_dir() and target.exists():
                old = self.staging / f".old-{item.name}"
                os.rename(target, old)
            os.replace(item, target)
        shutil.rmtree(self.staging)

    def discard(self) -> None:
        """Remove the staging folder and everything in it."""
        shutil.rmtree(self.staging, ignore_errors=True)

    def __enter__(self) -> StagedOutput:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.publish()
        else:
            self.discard()


class InputListWriter:
    """Writes each calibration sample as raw float32 files (4-D in N,H,W,C) and lists them.

    Integer and boolean inputs (token ids, masks) are written as float32 too: SNPE's and QAIRT's
    quantizers read every raw file as float32 unless told ``--use_native_input_files``
    (SNPE.md section 3), and float32 holds every integer up to 2^24 exactly (the datasets check that).
    """

    def __init__(self, output: StagedOutput, input_names: list[str]) -> None:
        self.output = output
        self.input_names = input_names
        self.lines: list[str] = []
        output.stage(RAW_DIR).mkdir()

    def add(self, sample: dict[str, np.ndarray]) -> None:
        """Write one sample's raw files and remember its line."""
        index = len(self.lines)
        self.write(index, sample)
        self.lines.append(self.line(index))

    def write(self, index: int, sample: dict[str, np.ndarray]) -> None:
        """Write the raw files of sample ``index`` (from any process that sees the staging folder;
        writing them again writes the same bytes)."""
        for relative, name in zip(self._files(index), self.input_names, strict=True):
            path = self.output.stage(relative)
            try:
                np.ascontiguousarray(to_snpe_layout(sample[name]), dtype="<f4").tofile(path)
            except OSError as exc:
                raise OnnxSnpeError(f"{path}: cannot write raw file: {exc.strerror or exc}") from exc

    def line(self, index: int) -> str:
        """Sample ``index``'s line of data.txt."""
        paths = [str(self.output.final(relative)) for relative in self._files(index)]
        if len(self.input_names) == 1:
            return paths[0]
        return " ".join(f"{name}:={path}" for name, path in zip(self.input_names, paths, strict=True))

    def list_written(self, count: int) -> None:
        """List samples 0 to ``count - 1``, whose raw files :meth:`write` wrote."""
        self.lines = [self.line(index) for index in range(count)]

    def _files(self, index: int) -> list[str]:
        if len(self.input_names) == 1:
            return [f"{RAW_DIR}/{index:05d}.raw"]
        return [f"{RAW_DIR}/{index:05d}_{k}_{re.sub(r'[^A-Za-z0-9._-]', '_', name)}.raw"
                for k, name in enumerate(self.input_names)]

    def finish(self) -> None:
        """Write data.txt."""
        self.output.stage(INPUT_LIST_FILE).write_text("".join(line + "\n" for line in self.lines))


ENCODING_FORMATS = ("legacy", "1.0.0")
"""The ``--quantization_overrides`` formats written (SNPE.md section 2): legacy, read by every SNPE and
QAIRT converter, and AIMET's 1.0.0, read by newer QAIRT (not by SNPE 2.5 and older)."""


def overrides_json(
    model: onnx.ModelProto,
    activations: dict[str, Encoding],
    params: dict[str, ParamEncoding],
    encoding_format: str = "legacy",
) -> dict:
    """The ``--quantization_overrides`` document, entries in graph order.

    Legacy: a dict of lists, a per-channel param with one entry per output channel, in channel
    order. 1.0.0: lists of named entries with a scale and an offset per channel (the offsets as
    in legacy, i.e. ``-2^(bw-1)`` for symmetric ones, as AIMET writes them).
    """
    if encoding_format not in ENCODING_FORMATS:
        raise ValueError(f"unknown encoding format {encoding_format!r}")
    order = [v.name for v in model.graph.input] + [o for n in model.graph.node for o in n.output]
    named_activations = [(name, activations[name]) for name in dict.fromkeys(order) if name in activations]
    named_params = [(init.name, params[init.name]) for init in model.graph.initializer if init.name in params]
    if encoding_format == "legacy":
        return {
            "activation_encodings": {name: enc.entries() for name, enc in named_activations},
            "param_encodings": {name: enc.entries() for name, enc in named_params},
        }
    return {
        "version": "1.0.0",
        "activation_encodings": [_v1_entry(name, enc) for name, enc in named_activations],
        "param_encodings": [_v1_entry(name, enc) for name, enc in named_params],
        "excluded_layers": [],
    }


def _v1_entry(name: str, enc: ParamEncoding) -> dict:
    """One tensor's 1.0.0 entry (AIMET's schema: name, dtype, enc_type, is_sym, bw, scale, offset)."""
    channels = enc.channels if isinstance(enc, ChannelEncodings) else (enc,)
    return {
        "name": name,
        "dtype": "INT",
        "enc_type": "PER_CHANNEL" if isinstance(enc, ChannelEncodings) else "PER_TENSOR",
        "is_sym": enc.is_symmetric,
        "bw": enc.bitwidth,
        "scale": [c.scale for c in channels],
        "offset": [float(c.offset) for c in channels],
    }


def write_json(path: Path, document: dict) -> None:
    """JSON with a fixed layout, so identical inputs give identical bytes."""
    path.write_text(json.dumps(document, indent=2, allow_nan=False) + "\n")


def write_model(path: Path, model: onnx.ModelProto) -> list[str]:
    """Save an ONNX model, in one file unless it is over protobuf's limit (graph/large.py); the
    names of the files written."""
    return save_model(model, path)
