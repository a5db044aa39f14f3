"""Calibration and evaluation samples: read from .npy, .npz, images or an SNPE input list.

A dataset is a sorted list of files read lazily, one sample at a time, so memory stays flat in the
number of samples. Every sample is checked against the model's inputs (names, rank, dtype, shape,
finite values, token ids within the table they index) and comes out as ``{input name: array with
batch dimension 1}``: float32 for float inputs, the model's own dtype for integer and boolean ones
(token ids, attention masks), which are never quantized.
"""

from __future__ import annotations

import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from ..errors import OnnxSnpeError
from ..graph.load import InputSpec

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp"})
Sample = dict[str, np.ndarray]


@dataclass(frozen=True)
class ImageOptions:
    """How images become model inputs: resize, channel order, then ``(x * scale - mean) / std``."""

    resize: tuple[int, int] | None = None  # (height, width); default: the model's static H, W
    color: str = "rgb"  # "rgb", "bgr" or "gray"
    scale: float = 1.0 / 255.0
    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)
    layout: str | None = None  # "nchw" or "nhwc"; default: guessed from the model's channel dim


@dataclass
class Dataset:
    """Samples for one set (calibration or evaluation), read on demand."""

    path: Path
    kind: str  # "npy", "npz", "image" or "input_list"
    entries: list = field(default_factory=list)
    inputs: list[InputSpec] = field(default_factory=list)
    image_options: ImageOptions = field(default_factory=ImageOptions)
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.entries)

    def __iter__(self) -> Iterator[Sample]:
        for index in range(len(self.entries)):
            yield self.load(index)

    def load(self, index: int) -> Sample:
        """Read and check sample ``index``."""
        entry = self.entries[index]
        if self.kind == "npy":
            sample = {self.inputs[0].name: _read_npy(entry)}
            where = entry
        elif self.kind == "npz":
            sample = _read_npz(entry)
            where = entry
        elif self.kind == "image":
            sample = {self.inputs[0].name: self._read_image(entry)}
            where = entry
        else:
            sample = self._read_raw(entry)
            where = self.path
        return self._check(sample, where)

    def _check(self, sample: Sample, where: Path) -> Sample:
        expected = {spec.name for spec in self.inputs}
        if set(sample) != expected:
            raise OnnxSnpeError(
                f"{where}: holds inputs {sorted(sample)}, the model expects {sorted(expected)}"
            )
        checked = {}
        for spec in self.inputs:
            array = sample[spec.name]
            array = _as_input_dtype(array, spec, where)
            if spec.dims and array.ndim == len(spec.dims) - 1:
                array = array[np.newaxis]
            if array.ndim != len(spec.dims):
                raise OnnxSnpeError(
                    f"{where}: input '{spec.name}' has rank {array.ndim} (shape {list(array.shape)}), "
                    f"the model expects rank {len(spec.dims)}"
                )
            batched = array.ndim and spec.dims[0] in (None, 1)  # a static first axis (a state's 2) is no batch
            if batched and array.shape[0] != 1:
                raise OnnxSnpeError(
                    f"{where}: input '{spec.name}' holds a batch of {array.shape[0]}; give one sample per file"
                )
            for axis, (got, want) in enumerate(zip(array.shape, spec.dims, strict=False)):
                if (axis > 0 or not batched) and want is not None and got != want:
                    raise OnnxSnpeError(
                        f"{where}: input '{spec.name}' has shape {list(array.shape)}, "
                        f"the model expects {_dims_text(spec.dims)}"
                    )
            first = self.shapes.setdefault(spec.name, array.shape)
            if array.shape != first:
                raise OnnxSnpeError(
                    f"{where}: input '{spec.name}' has shape {list(array.shape)}, earlier samples "
                    f"have {list(first)}; all samples must share one shape"
                )
            if array.dtype.kind == "f" and not np.all(np.isfinite(array)):
                raise OnnxSnpeError(f"{where}: input '{spec.name}' contains NaN or Inf")
            _check_indices(array, spec, where)
            _check_float_exact(array, spec, where)
            checked[spec.name] = np.ascontiguousarray(array, dtype=np.float32 if spec.dtype.kind == "f" else spec.dtype)
        return checked

    def _read_image(self, path: Path) -> np.ndarray:
        from PIL import Image, UnidentifiedImageError

        spec = self.inputs[0]
        layout, (height, width), channels = _image_geometry(spec, self.image_options, path)
        options = self.image_options
        try:
            with Image.open(path) as image:
                mode = "L" if channels == 1 else "RGB"
                image = image.convert(mode).resize((width, height), Image.Resampling.BILINEAR)
                pixels = np.asarray(image, dtype=np.float32)
        except (OSError, UnidentifiedImageError) as exc:
            raise OnnxSnpeError(f"{path}: cannot read image: {exc}") from exc
        if pixels.ndim == 2:
            pixels = pixels[:, :, np.newaxis]
        if options.color == "bgr":
            pixels = pixels[:, :, ::-1]
        pixels = pixels * np.float32(options.scale)
        mean = np.asarray(options.mean, dtype=np.float32)
        std = np.asarray(options.std, dtype=np.float32)
        for name, values in (("mean", mean), ("std", std)):
            if values.size not in (1, channels):
                raise OnnxSnpeError(f"--{name} needs 1 or {channels} values, got {values.size}")
        pixels = (pixels - mean) / std
        if layout == "nchw":
            pixels = pixels.transpose(2, 0, 1)
        return pixels[np.newaxis]

    def _read_raw(self, entry: dict[str, Path]) -> Sample:
        sample = {}
        for spec in self.inputs:
            shape = self.shapes.get(spec.name) or _static_shape(spec)
            if shape is None:
                raise OnnxSnpeError(
                    f"{self.path}: raw files carry no shape and input '{spec.name}' has dynamic dims "
                    f"{_dims_text(spec.dims)}; give --input-shape {spec.name}:1,..."
                )
            path = entry[spec.name]
            try:
                flat = np.fromfile(path, dtype="<f4")
            except OSError as exc:
                raise OnnxSnpeError(f"{path}: cannot read raw file: {exc.strerror}") from exc
            if flat.size != int(np.prod(shape)):
                raise OnnxSnpeError(
                    f"{path}: holds {flat.size} float32 values, input '{spec.name}' of shape "
                    f"{list(shape)} needs {int(np.prod(shape))}"
                )
            sample[spec.name] = from_snpe_layout(_from_float_raw(flat, spec, path), shape)
        return sample


def _as_input_dtype(array: np.ndarray, spec: InputSpec, where: Path) -> np.ndarray:
    """``array`` in the input's dtype: floats stay floats, integers fit the input's integer type, bools are bools."""
    want = spec.dtype.kind
    got = array.dtype.kind
    if want == "f" and got == "f":
        return array
    if want in "iu" and got in "iu":
        _check_within_dtype(array, spec, where)
        return array
    if want == "b" and got == "b":
        return array
    raise OnnxSnpeError(f"{where}: input '{spec.name}' has dtype {array.dtype}, the model expects {spec.dtype}")


FLOAT32_EXACT = 2**24
"""Integers up to this magnitude are exact in float32, the type of SNPE's raw input files."""


def _check_float_exact(array: np.ndarray, spec: InputSpec, where: Path) -> None:
    if array.dtype.kind in "iu" and array.size and int(np.abs(array).max()) > FLOAT32_EXACT:
        raise OnnxSnpeError(
            f"{where}: input '{spec.name}' holds integers beyond 2^24, which SNPE's float32 raw files "
            "cannot hold exactly"
        )


def _check_indices(array: np.ndarray, spec: InputSpec, where: Path) -> None:
    """Token ids and other indices within the table the input indexes (ONNX Gather: -n <= i < n)."""
    if spec.index_limit is None or not array.size:
        return
    low, high = int(array.min()), int(array.max())
    if low < -spec.index_limit or high >= spec.index_limit:
        raise OnnxSnpeError(
            f"{where}: input '{spec.name}' holds indices in [{low}, {high}], the table it indexes has "
            f"{spec.index_limit} rows"
        )


def _from_float_raw(flat: np.ndarray, spec: InputSpec, path: Path) -> np.ndarray:
    """A float32 raw file's values in the input's dtype; integer and boolean inputs must hold whole numbers."""
    if spec.dtype.kind == "f":
        return flat
    if not np.all(np.isfinite(flat)) or np.any(flat != np.round(flat)):
        raise OnnxSnpeError(f"{path}: input '{spec.name}' is {spec.dtype}, the raw file holds non-integer values")
    if spec.dtype.kind == "b":
        if np.any((flat != 0) & (flat != 1)):
            raise OnnxSnpeError(f"{path}: input '{spec.name}' is bool, the raw file holds values other than 0 and 1")
        return flat.astype(bool)
    _check_within_dtype(flat, spec, path)
    return flat.astype(spec.dtype)


def _check_within_dtype(values: np.ndarray, spec: InputSpec, where: Path) -> None:
    """Refuse values the integer input's dtype cannot hold (they would wrap)."""
    info = np.iinfo(spec.dtype)
    if values.size and (values.min() < info.min or values.max() > info.max):
        raise OnnxSnpeError(
            f"{where}: input '{spec.name}' holds values outside {spec.dtype} [{values.min()}, {values.max()}]"
        )


def to_snpe_layout(array: np.ndarray) -> np.ndarray:
    """The array as SNPE reads a raw input file: 4-D tensors N,C,H,W become N,H,W,C."""
    return array.transpose(0, 2, 3, 1) if array.ndim == 4 else array


def from_snpe_layout(flat: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Inverse of :func:`to_snpe_layout` for a flat raw file and the model's (NCHW) shape."""
    if len(shape) == 4:
        n, c, h, w = shape
        return flat.reshape(n, h, w, c).transpose(0, 3, 1, 2)
    return flat.reshape(shape)


def _static_shape(spec: InputSpec) -> tuple[int, ...] | None:
    if not spec.dims:
        return ()
    dims = (spec.dims[0] or 1, *spec.dims[1:])  # a static first axis stays, a dynamic one is the batch
    return None if any(d is None for d in dims) else tuple(int(d) for d in dims)


def _dims_text(dims: tuple[int | None, ...]) -> str:
    return "[" + ", ".join("?" if d is None else str(d) for d in dims) + "]"


def _image_geometry(
    spec: InputSpec, options: ImageOptions, path: Path
) -> tuple[str, tuple[int, int], int]:
    if len(spec.dims) != 4:
        raise OnnxSnpeError(
            f"{path}: images need a 4-D model input, '{spec.name}' is {_dims_text(spec.dims)}"
        )
    layout = options.layout
    if layout is None:
        if spec.dims[1] in (1, 3):
            layout = "nchw"
        elif spec.dims[3] in (1, 3):
            layout = "nhwc"
        else:
            raise OnnxSnpeError(
                f"cannot tell the layout of input '{spec.name}' {_dims_text(spec.dims)}; give --layout"
            )
    h_axis, w_axis, c_axis = (2, 3, 1) if layout == "nchw" else (1, 2, 3)
    channels = spec.dims[c_axis] or (1 if options.color == "gray" else 3)
    if options.resize is not None:
        size = options.resize
    elif spec.dims[h_axis] is not None and spec.dims[w_axis] is not None:
        size = (spec.dims[h_axis], spec.dims[w_axis])
    else:
        raise OnnxSnpeError(
            f"input '{spec.name}' has dynamic size {_dims_text(spec.dims)}; give --resize HEIGHT,WIDTH"
        )
    return layout, (int(size[0]), int(size[1])), int(channels)


def _read_npy(path: Path) -> np.ndarray:
    try:
        return np.load(path, allow_pickle=False)
    except ValueError as exc:
        if "pickle" in str(exc):
            raise OnnxSnpeError(f"{path}: pickled .npy files are not loaded (allow_pickle=False)") from exc
        raise OnnxSnpeError(f"{path}: not a valid .npy file: {exc}") from exc
    except (OSError, EOFError) as exc:
        raise OnnxSnpeError(f"{path}: cannot read .npy file: {exc}") from exc


def _read_npz(path: Path) -> Sample:
    try:
        with np.load(path, allow_pickle=False) as archive:
            return {key: archive[key] for key in archive.files}
    except ValueError as exc:
        if "pickle" in str(exc):
            raise OnnxSnpeError(f"{path}: pickled arrays are not loaded (allow_pickle=False)") from exc
        raise OnnxSnpeError(f"{path}: not a valid .npz file: {exc}") from exc
    except (OSError, EOFError, zipfile.BadZipFile) as exc:
        raise OnnxSnpeError(f"{path}: cannot read .npz file: {exc}") from exc


def open_dataset(
    path: str | Path,
    inputs: list[InputSpec],
    image_options: ImageOptions | None = None,
    input_shapes: dict[str | None, tuple[int, ...]] | None = None,
    num_samples: int | None = None,
) -> Dataset:
    """Find the samples at ``path`` (a folder of .npy/.npz/images, or an input list .txt)."""
    path = Path(path)
    image_options = image_options or ImageOptions()
    inputs = _apply_shapes(inputs, input_shapes or {})
    if not path.exists():
        raise OnnxSnpeError(f"calibration data not found: {path}")
    if path.is_file():
        if path.suffix.lower() != ".txt":
            raise OnnxSnpeError(f"{path}: expected a folder of samples or an SNPE input list (.txt)")
        kind, entries = "input_list", _read_input_list(path, inputs)
    else:
        kind, entries = _scan_folder(path, inputs)
    if num_samples is not None:
        if num_samples < 1:
            raise OnnxSnpeError(f"--num-samples must be at least 1, got {num_samples}")
        entries = entries[:num_samples]
    return Dataset(path=path, kind=kind, entries=entries, inputs=inputs, image_options=image_options)


def _apply_shapes(inputs: list[InputSpec], shapes: dict[str | None, tuple[int, ...]]) -> list[InputSpec]:
    names = {spec.name for spec in inputs}
    if None in shapes:  # an unnamed shape is the single input's
        if len(inputs) != 1:
            raise OnnxSnpeError(f"--input-shape needs NAME:DIMS, the model has inputs {sorted(names)}")
        shapes = {inputs[0].name if name is None else name: dims for name, dims in shapes.items()}
    for name in shapes:
        if name not in names:
            raise OnnxSnpeError(f"--input-shape names '{name}', the model's inputs are {sorted(names)}")
    fixed = []
    for spec in inputs:
        if spec.name in shapes:
            shape = tuple(shapes[spec.name])
            if len(shape) != len(spec.dims) or any(
                want is not None and got != want for got, want in zip(shape[1:], spec.dims[1:], strict=False)
            ):
                raise OnnxSnpeError(
                    f"--input-shape {spec.name}:{','.join(map(str, shape))} does not fit the model's "
                    f"{_dims_text(spec.dims)}"
                )
            spec = replace(spec, dims=(spec.dims[0], *shape[1:]) if shape else ())
        fixed.append(spec)
    return fixed


def _scan_folder(folder: Path, inputs: list[InputSpec]) -> tuple[str, list[Path]]:
    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    groups = {
        "npy": [p for p in files if p.suffix.lower() == ".npy"],
        "npz": [p for p in files if p.suffix.lower() == ".npz"],
        "image": [p for p in files if p.suffix.lower() in IMAGE_SUFFIXES],
    }
    found = {kind: paths for kind, paths in groups.items() if paths}
    if not found:
        raise OnnxSnpeError(f"{folder}: no samples (.npy, .npz, .jpg, .jpeg, .png or .bmp files)")
    if len(found) > 1:
        raise OnnxSnpeError(f"{folder}: mixes sample kinds ({', '.join(sorted(found))}); use one kind")
    kind, paths = next(iter(found.items()))
    if kind in ("npy", "image") and len(inputs) != 1:
        raise OnnxSnpeError(
            f"{folder}: .{kind} samples fit single-input models; this model has inputs "
            f"{[s.name for s in inputs]}: use .npz files keyed by input name"
        )
    return kind, paths


def _read_input_list(path: Path, inputs: list[InputSpec]) -> list[dict[str, Path]]:
    """Parse an SNPE input list: one sample a line, ``path`` or ``name:=path name2:=path2``."""
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise OnnxSnpeError(f"{path}: cannot read input list: {exc}") from exc
    names = [spec.name for spec in inputs]
    entries = []
    for number, line in enumerate(lines, 1):
        line = line.strip()
        if not line or line.startswith(("#", "%")):
            continue
        entry = {}
        for token in line.split():
            name, sep, file = token.rpartition(":=")
            if not sep:
                if len(names) != 1:
                    raise OnnxSnpeError(f"{path}:{number}: give name:=path for each of inputs {names}")
                name = names[0]
            if name not in names:
                raise OnnxSnpeError(f"{path}:{number}: unknown input '{name}', the model has {names}")
            file_path = Path(file)
            entry[name] = file_path if file_path.is_absolute() else path.parent / file_path
        missing = [n for n in names if n not in entry]
        if missing:
            raise OnnxSnpeError(f"{path}:{number}: no file for inputs {missing}")
        entries.append(entry)
    if not entries:
        raise OnnxSnpeError(f"{path}: input list has no samples")
    return entries
