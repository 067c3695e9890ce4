"""The sentencepiece tokenizer of LLaMA-family models, and training a small one.

Ziya-LLaMA-13B ships a sentencepiece model of 39,410 pieces while its embedding table has
39,424 rows: ids past the tokenizer's last piece exist in the model but never in text. The
wrapper below allows that (the model's vocab_size only has to be at least `len(tokenizer)`).

Special ids follow LLaMA: <unk> 0, <s> (bos) 1, </s> (eos) 2; padding reuses id 0, as Ziya's
config does (pad_token_id 0) — padded positions are masked out, so their id never matters.
Whether a text starts with <s> is the tokenizer's own setting, `add_bos_token` in the
tokenizer_config.json beside tokenizer.model (absent: True, the default of transformers'
LlamaTokenizer and of Baichuan's tokenizer class): Ziya's starts with it, HuatuoGPT-7B's
(Baichuan-7B's) does not. `Tokenizer.bos` holds it; data.template.render reads it.

    python tokenizer.py train --corpus data/*.jsonl --out tok.model --vocab-size 4096
    python tokenizer.py encode --model tok.model "我头痛三天了"
"""

from __future__ import annotations

import argparse
import functools
import heapq
import io
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Iterable, Iterator

import sentencepiece as spm

from safety import COUNT, run_main


class TokenizerError(ValueError):
    """A tokenizer file that cannot be used with its model, named; one line on a command line."""

    for_the_user = True


class Tokenizer:
    def __init__(self, model_file: str | os.PathLike, add_bos: bool | None = None):
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
        self.add_bos = read_add_bos(self.path.parent / "tokenizer_config.json") if add_bos is None else add_bos

    @property
    def bos(self) -> list[int]:
        """What a text starts with: [bos_id] if the tokenizer adds <s>, else nothing."""
        return [self.bos_id] if self.add_bos else []

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
                f"{vocab_size} ids: they do not belong together"
            )


def read_add_bos(config_file: Path) -> bool:
    """`add_bos_token` of a tokenizer_config.json; True where the file or the field is absent."""
    if not config_file.is_file():
        return True
    try:
        value = json.loads(config_file.read_text(encoding="utf-8")).get("add_bos_token", True)
    except (ValueError, OSError, AttributeError) as e:
        raise TokenizerError(f"{config_file}: not a readable tokenizer config ({e})") from None
    if not isinstance(value, bool):
        raise TokenizerError(f"{config_file}: add_bos_token is {value!r}, not true or false")
    return value


class StreamDecoder:
    """Turn a growing list of ids into text increments for streaming.

    A piece can be half of a multi-byte character (byte fallback), and a piece's leading space
    depends on what precedes it, so a token's text is known only by decoding it with the tokens
    before it. Decoding the whole reply on each token would cost O(n) a token and O(n²) a reply;
    instead a short window is decoded: from `prefix` (where the text emitted before last began)
    to the end, minus the same window's text up to `read` (where it ended). The two decodings
    start at the same piece, so they treat its leading space alike, and their difference is the
    new text (the scheme text-generation-inference's decode_token uses). The window moves on
    each time text is emitted, so it spans the tokens since the last two emissions.
    """

    def __init__(self, tokenizer: Tokenizer):
        self.tok, self.ids, self.prefix, self.read = tokenizer, [], 0, 0

    def push(self, token_id: int) -> str:
        self.ids.append(int(token_id))
        return self._emit(final=False)

    def flush(self) -> str:
        """What push held back, at the end: a sequence that stops mid-character decodes lossily."""
        return self._emit(final=True)

    def _emit(self, final: bool) -> str:
        before = self.tok.decode(self.ids[self.prefix : self.read])
        text = self.tok.decode(self.ids[self.prefix :])
        if not final and (len(text) <= len(before) or text.endswith("\ufffd")):
            return ""  # nothing yet, or an incomplete UTF-8 sequence: wait for its other bytes
        self.prefix, self.read = self.read, len(self.ids)
        return text[len(before) :]


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
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
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


def write_hf_tokenizer_files(
    tokenizer: str | os.PathLike | Tokenizer, directory: Path, hf_config: dict, chat_template: str | None = None
) -> str:
    """Copy tokenizer.model, write tokenizer.json (sentencepiece's BPE as a merge list: see
    hf_tokenizer_json) and the small JSON files transformers' LlamaTokenizer reads, with the chat
    template when given (data.template.chat_template). Returns how tokenizer.json stands, for
    the model card."""
    tok = tokenizer if isinstance(tokenizer, Tokenizer) else Tokenizer(tokenizer)
    src = tok.path
    shutil.copyfile(src, directory / "tokenizer.model")
    stat = src.stat()  # a run saves best/ again and again with one tokenizer: its tokenizer.json is made once
    fast, how = _tokenizer_json_text(str(src.resolve()), stat.st_size, stat.st_mtime_ns, tok.add_bos)
    if fast is not None:
        (directory / "tokenizer.json").write_text(fast, encoding="utf-8")
    special = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    # With tokenizer.json, transformers (4.x and 5.x) is to read it as written: its LlamaTokenizer of
    # 5.x keeps only the vocabulary and merges and puts back a Metaspace that drops a leading space.
    config = dict(
        special,
        tokenizer_class="PreTrainedTokenizerFast" if fast is not None else "LlamaTokenizer",
        add_bos_token=tok.add_bos,
        add_eos_token=False,
        model_max_length=hf_config.get("max_position_embeddings", 2048),
        legacy=True,
    )
    if chat_template:
        config["chat_template"] = chat_template
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    (directory / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n", encoding="utf-8")
    return how


# -- tokenizer.json: the same segmentation in Hugging Face's `tokenizers` ---------------------------
#
# sentencepiece's BPE encoder starts from characters and, again and again, joins the adjacent pair
# whose join is the vocabulary piece of highest score; between equal scores it takes the leftmost
# pair (bpe_model.cc). `tokenizers`' BPE joins the adjacent pair that comes first in a merge list.
# Listing every way to split each piece in order of its score therefore reproduces sentencepiece
# exactly when no two pieces share a score, as in a tokenizer sentencepiece trained (every piece
# its own score). A merged vocabulary does not: Chinese-LLaMA-Alpaca's recipe (and so, by all
# appearances, Ziya's 39,410 pieces) appends its new pieces with score 0, and for 有效果, with 有效
# and 效果 both score 0, sentencepiece takes the leftmost, 有效|果, whatever comes first in a list.
# No list can say "leftmost": were 果有 tied with them too, 有效果 would want 有效 before 效果,
# 效果有 效果 before 果有, and 果有效 果有 before 有效, a cycle. The order below satisfies as many
# of these left-before-right constraints as a topological order can (Kahn's, breaking each cycle
# at the piece fewest constraints wait on).
# Measured (tests/test_tokenizer.py's texts: data/sft, data/eval and 3 more, 527 in all; ids equal
# to sentencepiece's, through AutoTokenizer): LLaMA's own 32,000 pieces (karpathy/llama2.c's
# tokenizer.model) 527 of 527 in transformers 4.46.3 and 5.24.0; LLaMA + chinese_sp.model merged by
# that recipe (49,953 pieces, 11,291 tied) 487 of 527 in both, where transformers converting
# tokenizer.model itself gives 427 (4.46.3) and 451 (5.24.0). Exact ids from any vocabulary:
# sentencepiece (tokenizer.py), or transformers 4.x's LlamaTokenizer (the slow class, which runs it).


@functools.lru_cache(maxsize=4)
def _tokenizer_json_text(path: str, size: int, mtime_ns: int, add_bos: bool) -> tuple[str | None, str]:
    """hf_tokenizer_json of the file at `path` (as it is at that size and time), serialised."""
    fast, how = hf_tokenizer_json(Tokenizer(path, add_bos=add_bos))
    return (None if fast is None else json.dumps(fast, ensure_ascii=False)), how


def hf_tokenizer_json(tok: Tokenizer) -> tuple[dict | None, str]:
    """tokenizer.json for `tok` and a sentence on how it agrees with sentencepiece; (None, why)
    for a model whose normalisation it cannot express (LLaMA's: none, a space prefixed)."""
    sp = tok.sp
    if sp.normalize("a  b\tＡ①") != "▁a▁▁b\tＡ①":
        return None, (
            "no tokenizer.json: this tokenizer.model normalises text (not LLaMA's identity "
            "rule with a prefixed space), which the export does not reproduce"
        )
    ids = range(len(tok))
    vocab = {sp.id_to_piece(i): i for i in ids}
    normal = [i for i in ids if not (sp.is_control(i) or sp.is_unknown(i) or sp.is_byte(i) or sp.is_unused(i))]
    splits = {
        i: [(p[:k], p[k:]) for p in [sp.id_to_piece(i)] for k in range(1, len(p)) if p[:k] in vocab and p[k:] in vocab]
        for i in normal
    }
    by_score: dict[float, list[int]] = {}
    for i in normal:
        if splits[i]:
            by_score.setdefault(sp.get_score(i), []).append(i)
    order = []
    for score in sorted(by_score, reverse=True):
        order += _leftmost_first(by_score[score], splits)
    tied = sum(len(g) for g in by_score.values() if len(g) > 1)
    merges = [list(pair) for i in order for pair in splits[i]]
    special = [i for i in ids if sp.is_control(i) or sp.is_unknown(i)]
    bos = sp.id_to_piece(tok.bos_id)

    def start(type_id: int) -> list[dict]:
        return [{"SpecialToken": {"id": bos, "type_id": type_id}}] if tok.add_bos else []

    fast = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [
            {
                "id": i,
                "content": sp.id_to_piece(i),
                "single_word": False,
                "lstrip": False,
                "rstrip": False,
                "normalized": False,
                "special": True,
            }
            for i in special
        ],
        # sentencepiece's own rule: one ▁ before the text, every space a ▁ (a Metaspace pre-tokenizer
        # prefixes none to a text that begins with a space), and the text one word, unsplit
        "normalizer": {
            "type": "Sequence",
            "normalizers": [
                {"type": "Prepend", "prepend": "▁"},
                {"type": "Replace", "pattern": {"String": " "}, "content": "▁"},
            ],
        },
        "pre_tokenizer": None,
        # <s> before each sequence where the tokenizer adds it (tok.add_bos), as LlamaTokenizerFast builds it
        "post_processor": {
            "type": "TemplateProcessing",
            "single": [*start(0), {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [
                *start(0),
                {"Sequence": {"id": "A", "type_id": 0}},
                *start(1),
                {"Sequence": {"id": "B", "type_id": 1}},
            ],
            "special_tokens": {bos: {"id": bos, "ids": [tok.bos_id], "tokens": [bos]}} if tok.add_bos else {},
        },
        "decoder": {
            "type": "Sequence",
            "decoders": [
                {"type": "Replace", "pattern": {"String": "▁"}, "content": " "},
                {"type": "ByteFallback"},
                {"type": "Fuse"},
                {"type": "Strip", "content": " ", "start": 1, "stop": 0},
            ],
        },
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": sp.id_to_piece(sp.unk_id()),
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": True,
            "byte_fallback": any(sp.is_byte(i) for i in ids),
            "ignore_merges": False,
            "vocab": vocab,
            "merges": merges,
        },
    }
    if not tied:
        return fast, "tokenizer.json gives sentencepiece's ids (no two pieces share a score)"
    return fast, (
        f"tokenizer.json gives sentencepiece's ids except where pieces of equal score overlap "
        f"({tied} pieces share a score with another); exact: tokenizer.model with sentencepiece"
    )


def _leftmost_first(group: list[int], splits: dict) -> list[int]:
    """Pieces of one score in the order that puts P before Q wherever P's right part is Q's left
    part (u·v before v·w: sentencepiece joins the leftmost); a cycle is broken at the piece with
    fewest unmet constraints, then the lower id."""
    starting: dict[str, list[int]] = {}
    for i in group:
        for left, _ in splits[i]:
            starting.setdefault(left, []).append(i)
    after = {i: {j for _, right in splits[i] for j in starting.get(right, ()) if j != i} for i in group}
    waiting = dict.fromkeys(group, 0)
    for i in group:
        for j in after[i]:
            waiting[j] += 1
    heap = [(waiting[i], i) for i in group]
    heapq.heapify(heap)
    order, placed = [], set()
    while heap:
        n, i = heapq.heappop(heap)
        if i in placed or n != waiting[i]:
            continue
        placed.add(i)
        order.append(i)
        for j in after[i]:
            if j not in placed:
                waiting[j] -= 1
                heapq.heappush(heap, (waiting[j], j))
    return order


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train", help="train a sentencepiece model on JSONL conversations or text files")
    t.add_argument("--corpus", nargs="+", required=True)
    t.add_argument("--out", required=True)
    t.add_argument("--vocab-size", type=COUNT, default=4096)
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
