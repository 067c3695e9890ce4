"""The sentencepiece tokenizer of LLaMA-family models, and training a small one.

Ziya-LLaMA-13B ships a sentencepiece model of 39,410 pieces while its embedding table has
39,424 rows: ids past the tokenizer's last piece exist in the model but never in text. The
wrapper below allows that (the model's vocab_size only has to be at least `len(tokenizer)`).

Special ids follow LLaMA: <unk> 0, <s> (bos) 1, </s> (eos) 2; padding reuses id 0, as Ziya's
config does (pad_token_id 0) — padded positions are masked out, so their id never matters.

    python tokenizer.py train --corpus data/*.jsonl --out tok.model --vocab-size 4096
    python tokenizer.py encode --model tok.model "我头痛三天了"
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Iterable, Iterator

import sentencepiece as spm

from safety import run_main


class TokenizerError(ValueError):
    """A tokenizer file that cannot be used with its model, named; one line on a command line."""

    for_the_user = True


class Tokenizer:
    def __init__(self, model_file: str | os.PathLike):
        self.path = Path(model_file)
        if not self.path.is_file():
            raise FileNotFoundError(f"{self.path}: no sentencepiece model file")
        try:
            self.sp = spm.SentencePieceProcessor(model_file=str(self.path))
        except (RuntimeError, OSError) as e:
            raise TokenizerError(f"{self.path}: not a sentencepiece model ({e})") from None
        self.bos_id = self.sp.bos_id()
        self.eos_id = self.sp.eos_id()
        self.pad_id = self.sp.pad_id() if self.sp.pad_id() >= 0 else 0
        if self.bos_id < 0 or self.eos_id < 0:
            raise TokenizerError(f"{self.path}: the tokenizer defines no bos or eos piece")

    def __len__(self) -> int:
        return self.sp.get_piece_size()

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        ids = self.sp.encode(text)
        return [self.bos_id] * bos + ids + [self.eos_id] * eos

    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids`; special ids and ids beyond the tokenizer's pieces are skipped."""
        n, special = len(self), {self.bos_id, self.eos_id, self.pad_id}
        return self.sp.decode([int(i) for i in ids if 0 <= i < n and i not in special])

    def check_model_vocab(self, vocab_size: int, where: str = "model"):
        if vocab_size < len(self):
            raise TokenizerError(
                f"{self.path}: tokenizer has {len(self)} pieces but the {where} embeds only "
                f"{vocab_size} ids: they do not belong together")


class StreamDecoder:
    """Turn a growing list of ids into text increments for streaming.

    A piece can be half of a multi-byte character (byte fallback) and a piece's leading space
    depends on what precedes it, so we decode the whole tail and emit only what became final.
    """

    def __init__(self, tokenizer: Tokenizer):
        self.tok, self.ids, self.emitted = tokenizer, [], ""

    def push(self, token_id: int) -> str:
        self.ids.append(int(token_id))
        text = self.tok.decode(self.ids)
        if text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for its other bytes
            return ""
        new, self.emitted = text[len(self.emitted):], text
        return new

    def flush(self) -> str:
        """What push held back, at the end: a sequence that stops mid-character decodes lossily."""
        text = self.tok.decode(self.ids)
        new, self.emitted = text[len(self.emitted):], text
        return new


def train_tokenizer(sentences: Iterable[str], out: str | os.PathLike, vocab_size: int = 4096) -> Tokenizer:
    """Train a LLaMA-style BPE sentencepiece model on `sentences` and write it to `out`.

    LLaMA's settings: BPE, byte fallback (no character is ever <unk>), digits split one by one,
    no text normalisation. vocab_size is an upper bound: a small corpus may yield fewer pieces.
    """
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(list(sentences)),
        model_writer=model,
        model_type="bpe",
        vocab_size=vocab_size,
        hard_vocab_limit=False,
        character_coverage=0.9995,
        byte_fallback=True,
        split_digits=True,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        num_threads=1,  # deterministic: the same corpus gives the same model
        minloglevel=2,
    )
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_bytes(model.getvalue())
    os.replace(tmp, out)
    return Tokenizer(out)


def corpus_sentences(files: Iterable[str | os.PathLike]) -> Iterator[str]:
    """Text lines for tokenizer training: message contents of JSONL conversations, else lines."""
    for file in files:
        with open(file, encoding="utf-8") as f:
            for line_no, line in enumerate(f, start=1):
                line = line.strip()
                if not line:
                    continue
                if str(file).endswith(".jsonl"):
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError as e:
                        raise ValueError(f"{file}:{line_no}: not valid JSON ({e.msg})") from None
                    yield from _strings(record)
                else:
                    yield line


def _strings(obj) -> Iterator[str]:
    if isinstance(obj, str):
        yield obj
    elif isinstance(obj, dict):
        for key, value in obj.items():
            if key not in ("id", "source", "role"):
                yield from _strings(value)
    elif isinstance(obj, list):
        for value in obj:
            yield from _strings(value)


def write_hf_tokenizer_files(tokenizer: str | os.PathLike | Tokenizer, directory: Path, hf_config: dict,
                             chat_template: str | None = None):
    """Copy tokenizer.model and write the small JSON files transformers' LlamaTokenizer expects
    (with the chat template, when given: data.template.CHAT_TEMPLATE)."""
    src = tokenizer.path if isinstance(tokenizer, Tokenizer) else Path(tokenizer)
    shutil.copyfile(src, directory / "tokenizer.model")
    special = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    config = dict(special, tokenizer_class="LlamaTokenizer", add_bos_token=True, add_eos_token=False,
                  model_max_length=hf_config.get("max_position_embeddings", 2048), legacy=True)
    if chat_template:
        config["chat_template"] = chat_template
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    (directory / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n", encoding="utf-8")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train", help="train a sentencepiece model on JSONL conversations or text files")
    t.add_argument("--corpus", nargs="+", required=True)
    t.add_argument("--out", required=True)
    t.add_argument("--vocab-size", type=int, default=4096)
    e = sub.add_parser("encode", help="print the ids and pieces of a text")
    e.add_argument("--model", required=True)
    e.add_argument("text")
    args = p.parse_args(argv)
    if args.cmd == "train":
        tok = train_tokenizer(corpus_sentences(args.corpus), args.out, args.vocab_size)
        print(f"wrote {args.out}: {len(tok)} pieces")
    else:
        tok = Tokenizer(args.model)
        ids = tok.encode(args.text)
        print(ids)
        print([tok.sp.id_to_piece(i) for i in ids])


if __name__ == "__main__":
    sys.exit(run_main(main))
