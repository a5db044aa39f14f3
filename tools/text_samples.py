"""Calibration and held-out samples for the MiniLM-L6 sentence encoder, from real English sentences.

    python tools/text_samples.py CALIB_DIR EVAL_DIR [--calib 64] [--eval 32]

tools/sentences.txt holds 96 sentences written for this project (everyday topics, 8-20 words);
the first ``--calib`` become calibration samples, the last ``--eval`` held-out ones, so the two sets
never share a sentence. Each is tokenized with the model's WordPiece tokenizer
(../shared/models/minilm_tok/tokenizer.json, the ``tokenizers`` package: a test dependency, never
a core one), padded and truncated to 64 tokens, and written as an .npz of int64 ``input_ids``,
``attention_mask`` and ``token_type_ids`` [1, 64], the model's inputs.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SENTENCES = ROOT / "tools" / "sentences.txt"
TOKENIZER = ROOT.parent / "shared" / "models" / "minilm_tok" / "tokenizer.json"
LENGTH = 64


def write_samples(folder: Path, sentences: list[str], tokenizer_path: Path = TOKENIZER) -> None:
    """One .npz per sentence in ``folder``, as the MiniLM export takes it."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(tokenizer_path))
    tokenizer.enable_padding(length=LENGTH)
    tokenizer.enable_truncation(LENGTH)
    folder.mkdir(parents=True, exist_ok=True)
    for index, sentence in enumerate(sentences):
        encoded = tokenizer.encode(sentence)
        np.savez(folder / f"{index:04d}.npz",
                 input_ids=np.array([encoded.ids], np.int64),
                 attention_mask=np.array([encoded.attention_mask], np.int64),
                 token_type_ids=np.array([encoded.type_ids], np.int64))


def split_sentences(calib: int, held_out: int) -> tuple[list[str], list[str]]:
    """The first ``calib`` and the last ``held_out`` sentences (disjoint)."""
    sentences = [line.strip() for line in SENTENCES.read_text().splitlines() if line.strip()]
    if calib + held_out > len(sentences):
        raise SystemExit(f"only {len(sentences)} sentences: --calib + --eval must not exceed that")
    return sentences[:calib], sentences[len(sentences) - held_out:]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("calib_dir", type=Path)
    parser.add_argument("eval_dir", type=Path)
    parser.add_argument("--calib", type=int, default=64)
    parser.add_argument("--eval", type=int, default=32)
    args = parser.parse_args()
    calib, held_out = split_sentences(args.calib, args.eval)
    write_samples(args.calib_dir, calib)
    write_samples(args.eval_dir, held_out)


if __name__ == "__main__":
    main()
