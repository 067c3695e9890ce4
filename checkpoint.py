"""Checkpoint files in the Hugging Face layout: safetensors shards, their index, config.json,
the tokenizer and the model card, read and written without a model class.

Everything here works on `{name: shape}` and `{name: tensor}` dicts, in HF's tensor names:
pretrained.py maps them onto model.py's modules (hf_name, expected_shapes, our_names) and convert.py
and the trainers write through write_checkpoint. Reading is in two passes: every file's header
first (read_headers, check_shapes), then the tensors a file at a time, each checked as it comes
(read_tensors, check_weight), so that a truncated shard, an index that lies, a config.json of
another model or a NaN is one message naming the file, before any memory is spent on it;
writing is atomic (a temporary directory renamed into place), so that a crash leaves the old
checkpoint or the new one, never half of one. model_card is the README.md each export carries.
"""

from __future__ import annotations

import difflib
import errno
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from data.template import CHAT_SAMPLING, chat_template
from safety import replace_dir


class CheckpointError(ValueError):
    """A model directory or file that cannot be used, the message naming it and why: a command
    line prints it as one line and exits 2 (safety.run_main), as for any input of the user's."""

    for_the_user = True


def not_a_model(path: Path, builtin: list[str] | None = None) -> str:
    """What to tell a user whose model path holds no config.json: the checkpoints one level down
    (a trainer's OUT holds best/ and final/), or, for a path that is no directory, the `builtin`
    config names (where the command takes one) and the closest."""
    if path.is_dir():
        below = sorted(
            (c.parent for c in path.glob("*/config.json")),
            key=lambda found: (found.name not in ("best", "final"), found.name),
        )
        hint = f"; did you mean {' or '.join(str(found) for found in below[:3])}?" if below else ""
        return f"{path}: no config.json (expected an HF-format model directory){hint}"
    if builtin is None:
        return f"{path}: no such model directory (expected an HF-format model directory)"
    close = difflib.get_close_matches(str(path), builtin, n=1, cutoff=0.6)
    return f"{path}: neither a model directory nor a built-in config ({', '.join(builtin)})" + (
        f"; did you mean {close[0]}?" if close else ""
    )


def checkpoint_shards(path: Path) -> dict[Path, list[str] | None]:
    """Map each safetensors file of an HF directory to the tensor names the index assigns it."""
    index = path / "model.safetensors.index.json"
    single = path / "model.safetensors"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index}: not a valid safetensors index ({e!r})") from None
        shards: dict[Path, list[str]] = {}
        for name, file in weight_map.items():
            shards.setdefault(path / file, []).append(name)
        for shard, names in shards.items():
            if not shard.is_file():
                raise FileNotFoundError(
                    f"{index}: shard {shard.name} is missing (it holds {names[0]!r} and {len(names) - 1} more tensors)"
                )
        return shards
    if single.is_file():
        return {single: None}
    bins = sorted(path.glob("*.bin"))
    hint = f"; found {bins[0].name}: convert it first with `python convert.py --src {path} --out DIR`" if bins else ""
    raise FileNotFoundError(f"{path}: neither model.safetensors nor model.safetensors.index.json{hint}")


def tensor_shapes(file: Path):
    """(name, shape) of every tensor in one safetensors file, read from its header alone."""
    try:
        with safe_open(str(file), framework="pt", device="cpu") as f:
            return [(name, tuple(f.get_slice(name).get_shape())) for name in f.keys()]
    except (SafetensorError, OSError, ValueError, OverflowError) as e:
        raise CheckpointError(f"{file}: cannot read safetensors file, truncated or corrupt? ({e})") from None


def check_weight(shard: Path, name: str, tensor: torch.Tensor):
    """Refuse a tensor no model can use: integer or quantised data (casting it would be nonsense),
    or NaN and infinities (one pass over memory already read: cheap beside the read)."""
    if not tensor.is_floating_point():
        raise CheckpointError(f"{shard}: tensor {name!r} is {tensor.dtype}, expected floating-point weights")
    if not torch.isfinite(tensor).all():
        raise CheckpointError(f"{shard}: tensor {name!r} holds NaN or infinite values; the checkpoint is damaged")


def read_safetensors(file: Path, keep=None):
    """Yield (name, tensor) from one safetensors file, those named in `keep` only (every one
    when None; the others are never read), with errors that name the file."""
    try:
        with safe_open(str(file), framework="pt", device="cpu") as f:
            for name in f.keys():
                if keep is None or name in keep:
                    yield name, f.get_tensor(name)
    except (SafetensorError, OSError, OverflowError) as e:
        raise CheckpointError(f"{file}: cannot read safetensors file, truncated or corrupt? ({e})") from None


def is_buffer(name: str) -> bool:
    """RoPE's inverse frequencies: recomputed by the model, stored by older transformers only."""
    return name.endswith("rotary_emb.inv_freq")


def read_headers(path: Path) -> tuple[dict[Path, list[str] | None], dict[str, tuple]]:
    """An HF directory's shard files (checkpoint_shards) and the shape of every tensor they
    hold but buffers, from the headers alone. An index that assigns a file a tensor the file
    does not hold is refused here, before any data is read; so is a file that holds a tensor the
    index assigns to another file (or to none), naming both: which copy is the one written
    cannot be told (transformers 5.25 reads whichever file comes last)."""
    shards = checkpoint_shards(path)
    owner = {name: shard for shard, names in shards.items() for name in names or ()}
    found = {}
    for shard, names in shards.items():
        shapes = dict(tensor_shapes(shard))
        absent = sorted(set(names or ()) - set(shapes))
        if absent:
            raise CheckpointError(f"{shard}: the index assigns {absent[:3]} to this file, but it does not hold them")
        if names is not None:
            stray = sorted(n for n in set(shapes) - set(names) if not is_buffer(n))
            if stray:
                elsewhere = f"assigns it to {owner[stray[0]].name}" if stray[0] in owner else "does not list it"
                raise CheckpointError(
                    f"{shard}: holds a copy of {stray[0]!r}, but the index {elsewhere}; which copy is the one "
                    "written cannot be told: remove the stale copy, or rewrite the index"
                )
        found.update((name, shape) for name, shape in shapes.items() if not is_buffer(name))
    return shards, found


def check_shapes(found: dict, expected: dict, where, what: str, *, complete: bool = True):
    """Refuse tensors (HF name -> shape) that are not `expected`'s: a name `what` (the model a
    config.json describes) has no place for, a shape of another model, and where `complete`
    is asked, a tensor missing. Run on the headers before any data is read (a config.json of
    1,000 layers over a checkpoint of 40 is one message), and by convert.py on each group as
    it streams."""
    unexpected = sorted(set(found) - set(expected))
    if unexpected:
        more = f"; {len(unexpected) - 1} more" if len(unexpected) > 1 else ""
        raise CheckpointError(f"{where}: unexpected tensor {unexpected[0]!r} (not in {what}){more}")
    for name, shape in found.items():
        if tuple(shape) != tuple(expected[name]):
            raise CheckpointError(
                f"{where}: tensor {name!r} has shape {tuple(shape)}, but config.json implies {tuple(expected[name])}"
            )
    missing = sorted(set(expected) - set(found)) if complete else []
    if missing:
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise CheckpointError(f"{where}: checkpoint lacks tensors {missing[:5]}{more}")


def read_tensors(shards: dict[Path, list[str] | None], keep, *, dtype, device):
    """The tensors named in `keep` (HF names; no other is read), one shard file at a time: yields {HF name:
    tensor} for each file, every tensor checked (check_weight) and cast to `dtype` on `device`,
    so that a reader holds at most one file's tensors (distributed.load_sharded scatters each group
    before the next is read)."""
    for shard in shards:
        tensors = {}
        for name, tensor in read_safetensors(shard, keep):
            check_weight(shard, name, tensor)
            tensors[name] = tensor.to(device=device, dtype=dtype)
        yield tensors
        del tensors


def as_dtype(state_dict: dict, dtype: torch.dtype | None) -> dict:
    """Each tensor rounded to `dtype` (to nearest, ties to even: torch's cast), or as it is (None)."""
    return state_dict if dtype is None else {k: v.to(dtype) for k, v in state_dict.items()}


def write_checkpoint(
    path,
    hf_config: dict,
    tensor_groups,
    *,
    tokenizer=None,
    max_shard_bytes=5 * 2**30,
    extra_files: dict[str, bytes] | None = None,
):
    """Atomically write an HF-format directory.

    tensor_groups: an iterable of {name: tensor} dicts, consumed one at a time so a converter
    can stream a 13B model through modest memory. Each group is cut into shards of at most
    max_shard_bytes. Everything goes to a temporary sibling directory that is renamed into
    place only when complete: a crash never leaves a half-written checkpoint at `path`.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        shards: list[dict[str, int]] = []  # per written shard: tensor name -> bytes (no tensors kept)
        dtypes: set[torch.dtype] = set()

        def flush(shard):
            shards.append({name: t.numel() * t.element_size() for name, t in shard.items()})
            dtypes.update(t.dtype for t in shard.values())
            _save_shard(tmp, len(shards), shard)

        for group in tensor_groups:
            shard, size = {}, 0
            for name, t in group.items():
                nbytes = t.numel() * t.element_size()
                if shard and size + nbytes > max_shard_bytes:
                    flush(shard)
                    shard, size = {}, 0
                shard[name] = t
                size += nbytes
            if shard:
                flush(shard)
        n = len(shards)
        weight_map = {}
        for i, shard in enumerate(shards, start=1):
            final = "model.safetensors" if n == 1 else f"model-{i:05d}-of-{n:05d}.safetensors"
            os.rename(tmp / f"shard-{i}", tmp / final)
            weight_map.update(dict.fromkeys(shard, final))
        if n > 1:
            total = sum(sum(s.values()) for s in shards)
            index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
            _write_text(tmp / "model.safetensors.index.json", json.dumps(index, indent=2))
        dtype = str(dtypes.pop()).removeprefix("torch.") if len(dtypes) == 1 else "float32"
        hf_config = dict(hf_config, torch_dtype=dtype)
        _write_text(tmp / "config.json", json.dumps(hf_config, indent=2, ensure_ascii=False))
        if tokenizer is not None:
            from tokenizer import Tokenizer, write_hf_tokenizer_files

            tok = tokenizer if isinstance(tokenizer, Tokenizer) else Tokenizer(tokenizer)
            how = write_hf_tokenizer_files(tok, tmp, hf_config, chat_template=chat_template(tok.add_bos))
        else:
            how = "this checkpoint carries no tokenizer"
        if "README.md" in (extra_files or {}):  # the card says how this checkpoint's tokenizer.json stands
            extra_files = dict(
                extra_files, **{"README.md": extra_files["README.md"].replace(TOKEN_IDS.encode(), how.encode())}
            )
        generation = dict(
            do_sample=True,
            **CHAT_SAMPLING,
            bos_token_id=hf_config.get("bos_token_id", 1),
            eos_token_id=hf_config.get("eos_token_id", 2),
            pad_token_id=hf_config.get("pad_token_id", 0),
        )
        _write_text(tmp / "generation_config.json", json.dumps(generation, indent=2))  # chat.py's settings
        for name, data in (extra_files or {}).items():
            (tmp / name).write_bytes(data)
            _fsync(tmp / name)
        _apply_umask(tmp)
        replace_dir(tmp, path)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if e.errno in (errno.ENOSPC, errno.EDQUOT):  # said of the checkpoint asked for, not of its temporary
            raise OSError(e.errno, e.strerror, str(path)) from None
        raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _save_shard(directory: Path, i: int, shard: dict):
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in shard.items()}
    try:
        save_file(tensors, str(directory / f"shard-{i}"), metadata={"format": "pt"})
    except SafetensorError as e:  # its own words for a full disk ("No space left" inside a Rust error)
        if shutil.disk_usage(directory).free < 64 << 20 or "No space left" in str(e):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(directory)) from None
        raise
    _fsync(directory / f"shard-{i}")


def _write_text(file: Path, text: str):
    file.write_text(text + "\n", encoding="utf-8")
    _fsync(file)


def _fsync(file: Path):
    with open(file, "rb") as f:
        os.fsync(f.fileno())


def _apply_umask(directory: Path):
    """mkdtemp makes a directory only its owner may enter, and safetensors writes files only
    its owner may read: give the checkpoint the permissions the user's umask asks for, as any
    file they create gets."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(directory, 0o777 & ~mask)
    for f in directory.iterdir():
        os.chmod(f, 0o666 & ~mask)


# What a checkpoint says of itself: its README.md


STAGES = {  # what each checkpoint is, in the paper's words
    "base": "the base model converted to the Hugging Face safetensors layout by convert.py, not fine-tuned: "
    "where SFT starts (paper App. E: Ziya-LLaMA-13B)",
    "sft": "supervised fine-tuning on distilled and real-world medical data (paper §3.1)",
    "rm": "the reward model of RLMF, trained on mixed-feedback preference pairs (paper §3.2)",
    "ppo": "the policy after reinforcement learning with mixed feedback, PPO with a KL penalty (paper §3.2)",
}


TOKEN_IDS = "{how tokenizer.json stands}"  # write_checkpoint fills it in: tokenizer.hf_tokenizer_json's sentence


def model_card(stage: str, *, base: str, data: list[tuple[str, str]], figures: list[str], command: str) -> str:
    """The README.md of an exported checkpoint: what it is, what it was trained from and on
    (data: (file, digest) pairs), the run's own figures, how to load it, and what it must not be
    used for."""
    files = "\n".join(f"- `{Path(f).name}` (sha256 {digest}…)" for f, digest in data) or "- (none)"
    shown = "\n".join(f"- {line}" for line in figures) or "- (none recorded)"
    loading = (
        "```python\nfrom pretrained import load_reward_model  # this repository\nrm = load_reward_model(PATH)\n\n"
        "from transformers import AutoModelForSequenceClassification  # the same score, at the last non-pad token\n"
        "rm = AutoModelForSequenceClassification.from_pretrained(PATH)\n```"
        if stage == "rm"
        else "```bash\npython chat.py --model PATH                   # this repository, streamed, multi-turn\n"
        "python serve.py --model PATH                  # OpenAI-compatible, http://127.0.0.1:8000/v1\n"
        "vllm serve PATH                               # vLLM: prompts with the chat template below\n```\n\n"
        "```python\nfrom transformers import AutoModelForCausalLM, AutoTokenizer\n"
        "tok = AutoTokenizer.from_pretrained(PATH)\nmodel = AutoModelForCausalLM.from_pretrained(PATH)\n"
        'ids = tok.apply_chat_template([{"role": "user", "content": "头痛三天了怎么办？"}],\n'
        '                              add_generation_prompt=True, return_tensors="pt")\n```\n\n'
        "The chat template (`tokenizer_config.json`) is the official HuatuoGPT demo's prompt; encoded whole, "
        "it differs at each role tag from the segment-wise ids this model was trained on "
        "(`data/template.py`), which `chat.py` and `serve.py` use. `generation_config.json` holds "
        "`chat.py`'s sampling settings."
    )
    loading += (
        "\n\n**Token ids.** `tokenizer.model` (sentencepiece, as `tokenizer.py` reads it) gives the ids this "
        "model was trained on. `tokenizer.json` is the same vocabulary as a merge list for Hugging Face's "
        "fast tokenizers (transformers, vLLM, TGI). Here: " + TOKEN_IDS + ". Where pieces share a score "
        "(a merged vocabulary such as Ziya's: new pieces appended with score 0) sentencepiece joins the "
        "leftmost of two overlapping pieces, which no merge list expresses: for exact ids encode with "
        "sentencepiece (or transformers 4.x's slow `LlamaTokenizer.from_pretrained(PATH)`) and pass the "
        "ids (vLLM: `prompt_token_ids`)."
    )
    return f"""---
language: [zh]
base_model: {base}
tags: [medical, huatuogpt, llama, {stage}]
---

# HuatuoGPT, {stage.upper()} checkpoint

{STAGES[stage][0].upper() + STAGES[stage][1:]}, written by this repository's `{command}`
(a reimplementation of *HuatuoGPT, Towards Taming Language Models To Be a Doctor*, Zhang et al.,
2023). A LLaMA in the Hugging Face layout.

## Trained from and on

- base: `{base}`
{files}

## This run's figures

{shown}

## How to load it

{loading}

## Intended use and limitations

For research on medical dialogue models: reproducing and studying the paper's recipe. Not for
diagnosis or treatment. A language model can state wrong medical facts fluently, miss what a
doctor would ask, and reflect the biases of its data; its answers have not been checked by
clinicians. A checkpoint of the embedded default (a tiny model trained in minutes) shows that
the recipe runs, not that it gives good answers.

## Disclaimer / 免责声明

This model does not give medical advice. Its output may be wrong or harmful; never use it in
place of a doctor, and seek professional care for any health concern or emergency.

本模型不提供医疗建议。其输出可能有误或有害，不能代替医生；如有健康问题或紧急情况，请及时就医。
"""
