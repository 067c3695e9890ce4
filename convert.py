"""Turn released checkpoints into the safetensors layout model.py loads.

Ziya-LLaMA-13B is published as *delta* weights in PyTorch `.bin` shards: the real weights are
LLaMA-13B's plus the delta, except the embedding and the LM head, which are the delta's as they
are (Ziya's vocabulary of 39,424 rows differs from LLaMA's 32,000). `rotary_emb.inv_freq`
buffers, written by old transformers versions, are dropped: model.py computes them.

    # .bin (or safetensors) shards -> model.safetensors(.index.json), nothing added
    python convert.py --src ZIYA_OR_LLAMA_DIR --out OUT_DIR
    # apply Ziya's delta to the original LLaMA-13B
    python convert.py --base LLAMA13B_DIR --delta ZIYA_DELTA_DIR --out OUT_DIR

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
from model import ModelConfig, check_tensors, expected_shapes
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
    for d in dirs:
        if d is not None and (d / "config.json").is_file():
            hf = json.loads((d / "config.json").read_text(encoding="utf-8"))
            ModelConfig.from_hf(hf, source=str(d / "config.json"))  # refuse what model.py cannot run
            return hf, d / "config.json"
    raise FileNotFoundError(f"no config.json in {', '.join(str(d) for d in dirs if d is not None)}")


def checked(hf: dict, where: Path, groups):
    """The tensor groups as they stream to the writer, each checked against the config first
    (names, shapes), and all of them at the end: what is written is a model that loads."""
    config = ModelConfig.from_hf(hf, source=str(where / "config.json"))
    expected, seen = expected_shapes(config), {}
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
    tokenizer = checked_tokenizer(_tokenizer(src), hf)

    def groups():
        for file in files.files:
            tensors = files.load(file)
            yield {n: (t if dtype is None else t.to(dtype)) for n, t in tensors.items() if not is_buffer(n)}

    write_checkpoint(
        out,
        hf,
        checked(hf, src, groups()),
        tokenizer=tokenizer,
        max_shard_bytes=max_shard_bytes,
        extra_files={
            "README.md": model_card(
                "base", base=src.name, data=[], command="convert.py", figures=[f"converted from {src}"]
            ).encode()
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
    p.add_argument("--delta", type=Path, help="the delta weights (Ziya-LLaMA-13B-Pretrain-v1)")
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
