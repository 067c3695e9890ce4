"""Turn released checkpoints into the safetensors layout model.py loads.

Ziya-LLaMA-13B is published as *delta* weights in PyTorch `.bin` shards: the real weights are
LLaMA-13B's plus the delta, except the embedding and the LM head, which are the delta's as they
are (Ziya's vocabulary of 39,424 rows differs from LLaMA's 32,000). `rotary_emb.inv_freq`
buffers, written by old transformers versions, are dropped: model.py computes them.

    # .bin (or safetensors) shards -> model.safetensors(.index.json), nothing added
    python convert.py --src ZIYA_OR_LLAMA_DIR --out OUT_DIR
    # apply a delta to the original LLaMA-13B: Ziya-LLaMA-13B-Pretrain-v1's, or HuatuoGPT-13b-delta's
    # (the official README applies it to LLaMA-13B too: docs/base-model.md)
    python convert.py --base LLAMA13B_DIR --delta ZIYA_OR_HUATUOGPT_13B_DELTA_DIR --out OUT_DIR
    # HuatuoGPT-7B (Baichuan-7B's layout): W_pack split into q, k and v, a LLaMA config written
    python convert.py --src HUATUOGPT_7B_DIR --out OUT_DIR [--dtype bfloat16]
    # HuatuoGPT-reward-model-7B (Ziya's LlamaRewardModel): value_head -> score, format ziya-rm
    python convert.py --src HUATUOGPT_REWARD_MODEL_7B_DIR --out OUT_DIR

Baichuan-7B's layout (model_type "baichuan", with max_position_embeddings) is LLaMA's but for
the attention's input projection, one `self_attn.W_pack.weight` of (3H, H) whose rows
[0:H], [H:2H], [2H:3H] are q, k and v (its modeling code unflattens the output as (3, H):
baichuan-inc/Baichuan-7B models/modeling_baichuan.py, commit 0ae400d), and RoPE in the
rotate-half layout with base 10000, the constant of its RotaryEmbedding. Its `inv_freq`
buffers are checked against that base, then dropped. Baichuan2-7B's (HuatuoGPT-II-7B's base) is
the same but for its NormHead, whose rows are normalised here (BAICHUAN2_VOCAB). Baichuan-13B's
and Baichuan2-13B's layout (ALiBi) is refused (pretrained.config_from_hf).

Work goes one source shard at a time (with the base read through memory maps), so merging a
13B model needs about one shard's worth of memory, not the whole model. `.bin` files are only
read with torch.load(weights_only=True): never unpickled as arbitrary code.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from safety import POSITIVE, refuse_to_replace, run_main
from checkpoint import CheckpointError, is_buffer, model_card, read_safetensors, write_checkpoint
from pretrained import config_from_hf
from pretrained import check_tensors, expected_shapes, reward_meta
from tokenizer import Tokenizer

# Taken from the delta as they are, not added: their shapes follow Ziya's vocabulary.
DELTA_REPLACES = ("model.embed_tokens.weight", "lm_head.weight")


class CheckpointFiles:
    """The tensors of an HF directory in .bin or safetensors shards, read a shard at a time."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_dir():
            raise FileNotFoundError(f"{self.path}: not a directory")
        for index_name, single in (
            ("pytorch_model.bin.index.json", "pytorch_model.bin"),
            ("model.safetensors.index.json", "model.safetensors"),
        ):
            index = self.path / index_name
            if index.is_file():
                try:
                    weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
                except (json.JSONDecodeError, KeyError, TypeError) as e:
                    raise CheckpointError(f"{index}: not a valid checkpoint index ({e!r})") from None
                self.files = sorted({self.path / f for f in weight_map.values()})
                self.where = {name: self.path / f for name, f in weight_map.items()}
                break
            if (self.path / single).is_file():
                self.files, self.where = [self.path / single], None
                break
        else:
            raise FileNotFoundError(f"{self.path}: no pytorch_model.bin(.index.json) or model.safetensors(.index.json)")
        for f in self.files:
            if not f.is_file():
                raise FileNotFoundError(f"{self.path}: shard {f.name} named in the index is missing")
        self._cached: tuple[Path, dict] | None = None

    def load(self, file: Path) -> dict[str, torch.Tensor]:
        if self._cached and self._cached[0] == file:
            return self._cached[1]
        if file.suffix == ".safetensors":
            tensors = dict(read_safetensors(file))
        else:
            try:  # memory-mapped where the file is in the zip format, so pages load on demand
                tensors = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError:
                try:
                    tensors = torch.load(file, map_location="cpu", weights_only=True)
                except Exception as e:
                    raise CheckpointError(f"{file}: cannot read as a PyTorch weights file ({e})") from None
            except Exception as e:
                raise CheckpointError(f"{file}: cannot read as a PyTorch weights file ({e})") from None
            if not isinstance(tensors, dict):
                raise CheckpointError(f"{file}: expected a dict of tensors, found {type(tensors).__name__}")
        self._cached = (file, tensors)
        return tensors

    def names(self) -> set[str]:
        if self.where is not None:
            return set(self.where)
        return set(self.load(self.files[0]))

    def get(self, name: str) -> torch.Tensor | None:
        file = self.files[0] if self.where is None else self.where.get(name)
        return None if file is None else self.load(file).get(name)


def read_config(*dirs: Path) -> tuple[dict, Path]:
    """The first config.json among `dirs`, refused unless model.py runs it (a Baichuan-7B
    config: as LLaMA's, baichuan_config), before any tensor is read."""
    for d in dirs:
        if d is not None and (d / "config.json").is_file():
            hf = json.loads((d / "config.json").read_text(encoding="utf-8"))
            if hf.get("model_type") == "baichuan" and "max_position_embeddings" in hf:
                hf = baichuan_config(hf)
            config_from_hf(hf, source=str(d / "config.json"))  # refuse what model.py cannot run
            return hf, d / "config.json"
    raise FileNotFoundError(f"no config.json in {', '.join(str(d) for d in dirs if d is not None)}")


BAICHUAN_ROPE_BASE = 10000.0  # Baichuan-7B's RotaryEmbedding(base=10000): no config field holds it
# Baichuan2's vocabulary: the one mark of its 7B layout, which shares Baichuan-7B's config fields.
# Its LM head is a NormHead that computes with each row L2-normalised (Baichuan2-7B-Chat
# modeling_baichuan.py at 84603cd, line 508, as vLLM's baichuan.py cites it and tells the two
# apart: vocab_size == 125696). The rows are normalised here, once, so model.py's plain head
# computes the same logits.
BAICHUAN2_VOCAB = 125696


def baichuan_config(hf: dict) -> dict:
    """A Baichuan-7B config.json as the LLaMA config of the same network (no custom code)."""
    keep = {k: v for k, v in hf.items() if k not in ("auto_map", "architectures", "model_type", "_name_or_path")}
    return dict(
        keep,
        model_type="llama",
        architectures=["LlamaForCausalLM"],
        num_key_value_heads=hf["num_attention_heads"],
        rope_theta=BAICHUAN_ROPE_BASE,
    )


def llama_tensors(tensors: dict, hf: dict, where: Path, baichuan: bool = False) -> dict:
    """One file's tensors under LLaMA's names: a Baichuan W_pack split into q, k and v; RoPE's
    stored inverse frequencies dropped, after a check against the config's base when they come
    from Baichuan's layout (its code loads and uses the stored buffer: a checkpoint with other
    values computes other positions; transformers' LLaMA recomputes them)."""
    hidden, heads, base = hf["hidden_size"], hf["num_attention_heads"], hf.get("rope_theta", 10000.0)
    dim = hidden // heads
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    out = {}
    for name, t in tensors.items():
        if is_buffer(name):
            if baichuan and (t.shape != inv_freq.shape or not torch.allclose(t.double(), inv_freq, rtol=1e-3, atol=0)):
                raise CheckpointError(
                    f"{where}: {name} is not RoPE's inverse frequencies for base {base:g} and head size {dim}: "
                    "model.py would place the positions otherwise"
                )
            continue
        if name.endswith("self_attn.W_pack.weight"):
            if t.shape != (3 * hidden, hidden):
                raise CheckpointError(f"{where}: {name} has shape {tuple(t.shape)}, not (3 x {hidden}, {hidden})")
            prefix = name.removesuffix("W_pack.weight")
            for i, part in enumerate(("q_proj", "k_proj", "v_proj")):
                out[f"{prefix}{part}.weight"] = t[i * hidden : (i + 1) * hidden].clone()
            continue
        if baichuan and name == "lm_head.weight" and hf["vocab_size"] == BAICHUAN2_VOCAB:
            t = torch.nn.functional.normalize(t.float(), dim=-1).to(t.dtype)  # NormHead (see BAICHUAN2_VOCAB)
        out[name] = t
    return out


def checked(hf: dict, where: Path, groups, expected: dict | None = None):
    """The tensor groups as they stream to the writer, each checked against the config first
    (names, shapes; `expected`, else a causal LM's), and all of them at the end: what is
    written is a model that loads."""
    config = config_from_hf(hf, source=str(where / "config.json"))
    expected, seen = expected or expected_shapes(config), {}
    for group in groups:
        shapes = {name: tuple(t.shape) for name, t in group.items()}
        check_tensors(config, shapes, where, expected, complete=False)
        seen.update(shapes)
        yield group
    check_tensors(config, seen, where, expected)


def checked_tokenizer(path: Path | None, hf: dict) -> Path | None:
    """The tokenizer to copy beside the weights, once it loads and fits the model's vocabulary."""
    if path is not None:
        Tokenizer(path).check_model_vocab(hf["vocab_size"], where=f"model of {path.parent / 'config.json'}")
    return path


def convert(src: Path, out: Path, dtype: torch.dtype | None = None, max_shard_bytes: int = 5 * 2**30):
    """Copy a checkpoint's tensors into the safetensors layout, shard by shard."""
    files = CheckpointFiles(src)
    hf, _ = read_config(src)
    if "value_head.weight" in files.names():
        return convert_reward(files, hf, out, dtype, max_shard_bytes)
    tokenizer = checked_tokenizer(_tokenizer(src), hf)
    baichuan = json.loads((src / "config.json").read_text(encoding="utf-8")).get("model_type") == "baichuan"
    notes = []
    if baichuan and hf["vocab_size"] == BAICHUAN2_VOCAB:
        notes = ["Baichuan2's NormHead: each row of lm_head.weight L2-normalised, as its code computes with it"]
        print(notes[0])

    def groups():
        for file in files.files:
            tensors = llama_tensors(files.load(file), hf, file, baichuan)
            yield {n: (t if dtype is None else t.to(dtype)) for n, t in tensors.items()}

    write_checkpoint(
        out,
        hf,
        checked(hf, src, groups()),
        tokenizer=tokenizer,
        max_shard_bytes=max_shard_bytes,
        extra_files={
            "README.md": model_card(
                "base", base=src.name, data=[], command="convert.py", figures=[f"converted from {src}"] + notes
            ).encode()
        },
    )


def convert_reward(files: CheckpointFiles, hf: dict, out: Path, dtype, max_shard_bytes: int):
    """The released HuatuoGPT-reward-model-7B's layout (Ziya's LlamaRewardModel: a `model.`
    trunk, no LM head, `value_head.weight` (1, H) and, where present, `value_head.bias` (1,),
    the score read at the last real token) -> model.RewardModel's: the head as `score.weight`
    and `score.bias`, a LlamaForSequenceClassification config of one label, and a
    reward_config.json naming its prompt format, "ziya-rm" (data.template.REWARD_FORMATS), so
    that every scorer renders a pair for it as it was trained."""
    src = files.path
    config = config_from_hf(hf, source=str(src / "config.json"))
    bias = files.get("value_head.bias")
    expected = {k: v for k, v in expected_shapes(config).items() if k != "lm_head.weight"}
    expected["score.weight"] = (1, config.hidden_size)
    if bias is not None:
        expected["score.bias"] = (1,)
    out_hf = dict(
        hf,
        architectures=["LlamaForSequenceClassification"],
        num_labels=1,
        id2label={"0": "LABEL_0"},
        label2id={"LABEL_0": 0},
    )

    def groups():
        for file in files.files:
            tensors = llama_tensors(files.load(file), hf, file)
            tensors = {name.replace("value_head.", "score.", 1): t for name, t in tensors.items()}
            yield {n: (t if dtype is None else t.to(dtype)) for n, t in tensors.items()}

    figures = [f"converted from {src}: value_head -> score, prompt format ziya-rm"]
    if bias is not None:
        figures.append(
            f"score.bias {float(bias.reshape(-1)[0]):.6g}: model.py adds it; transformers' "
            "LlamaForSequenceClassification has no bias, reports score.bias as unexpected and scores this much lower"
        )
    meta = json.dumps(reward_meta("ziya-rm", bias), indent=2) + "\n"
    write_checkpoint(
        out,
        out_hf,
        checked(hf, src, groups(), expected),
        tokenizer=checked_tokenizer(_tokenizer(src), hf),
        max_shard_bytes=max_shard_bytes,
        extra_files={
            "reward_config.json": meta.encode(),
            "README.md": model_card("rm", base=src.name, data=[], command="convert.py", figures=figures).encode(),
        },
    )


def apply_delta(base: Path, delta: Path, out: Path, dtype: torch.dtype | None = None, max_shard_bytes: int = 5 * 2**30):
    """out = base + delta for every tensor, except DELTA_REPLACES, which come from the delta."""
    b, d = CheckpointFiles(base), CheckpointFiles(delta)
    hf, _ = read_config(delta, base)  # the delta's config carries Ziya's vocabulary size
    missing = sorted(n for n in d.names() - b.names() if not is_buffer(n) and n not in DELTA_REPLACES)
    if missing:
        raise CheckpointError(f"{base}: base checkpoint lacks {missing[:3]} that the delta {delta} changes")
    uncovered = sorted(n for n in b.names() - d.names() if not is_buffer(n))
    if uncovered:
        raise CheckpointError(f"{delta}: delta lacks {uncovered[:3]}, present in the base {base}")

    def groups():
        for file in d.files:
            merged = {}
            for name, dt in d.load(file).items():
                if is_buffer(name):
                    continue
                target = dtype or dt.dtype
                if name in DELTA_REPLACES:
                    merged[name] = dt.to(target)
                    continue
                bt = b.get(name)
                if bt.shape != dt.shape:
                    raise CheckpointError(
                        f"{name}: base {base} has shape {tuple(bt.shape)}, delta {delta} has {tuple(dt.shape)}"
                    )
                merged[name] = (bt.float() + dt.float()).to(target)  # add in fp32, then round once
            yield merged

    write_checkpoint(
        out,
        hf,
        checked(hf, delta, groups()),
        tokenizer=checked_tokenizer(_tokenizer(delta, base), hf),
        max_shard_bytes=max_shard_bytes,
        extra_files={
            "README.md": model_card(
                "base",
                base=f"{base.name} + {delta.name}",
                data=[],
                command="convert.py --base --delta",
                figures=[f"the delta {delta} added to {base}"],
            ).encode()
        },
    )


def _tokenizer(*dirs: Path) -> Path | None:
    for d in dirs:
        if (d / "tokenizer.model").is_file():
            return d / "tokenizer.model"
    return None


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--src", type=Path, help="a checkpoint to convert as it is")
    p.add_argument("--base", type=Path, help="the original LLaMA weights the delta applies to")
    p.add_argument("--delta", type=Path, help="the delta weights (Ziya-LLaMA-13B-Pretrain-v1, or HuatuoGPT-13b-delta)")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], help="default: as stored")
    p.add_argument("--max-shard-gb", type=POSITIVE, default=5.0)
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    args = p.parse_args(argv)
    refuse_to_replace(
        args.out.parent,
        [args.out.name],
        overwrite=args.overwrite,
        what="model",
        inputs=[args.src, args.base, args.delta],
    )
    dtype = getattr(torch, args.dtype) if args.dtype else None
    shard = int(args.max_shard_gb * 2**30)
    if args.src and not (args.base or args.delta):
        convert(args.src, args.out, dtype, shard)
    elif args.base and args.delta and not args.src:
        apply_delta(args.base, args.delta, args.out, dtype, shard)
    else:
        p.error("give either --src, or both --base and --delta")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    sys.exit(run_main(main))
