"""The Hugging Face layout of model.py's networks: config.json both ways, the tensor names, and
the checkpoints of the three models loaded and saved side by side. The one module that calls
checkpoint.py (shards, headers, the atomic writer) for a model.

    config.json     config_from_hf (refusing what model.py does not run), read_config,
                    config_to_hf, load_config (a directory or a named config)
    tensor names    hf_name, our_names, expected_shapes, check_tensors: HF's names are ours
                    with `model.` before them
    causal LM       load_transformer / read_transformer / save_transformer: LlamaForCausalLM's
                    layout, streamed shard by shard
    reward model    load_reward_model / read_reward_model / save_reward_model: the trunk under
                    `model.`, the head as `score.weight` (and `score.bias`), no LM head,
                    LlamaForSequenceClassification's; reward_config.json names its prompt format
    PPO policy      save_policy: the causal LM and value_head.safetensors beside it
    legacy          a reward model saved as a causal LM with score_head.safetensors (our layout
                    before the HF one): read, never written

save_model(model, path, ...) writes whichever of the three `model` is (training.save_hf calls it).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, fields
from pathlib import Path

import torch
import torch.nn as nn
from safetensors.torch import load as load_safetensors, save as save_safetensors

from checkpoint import (
    CheckpointError,
    as_dtype,
    check_shapes,
    not_a_model,
    read_headers,
    read_tensors,
    write_checkpoint,
)
from data.template import REWARD_FORMATS
from lora import merge_lora
from model import CONFIGS, ModelConfig, PolicyWithValue, RewardModel, Transformer

# ----------------------------------------------------------------------------------------------
# config.json


def config_from_hf(hf: dict, source: str = "config.json") -> ModelConfig:
    """Read an HF config dict, refusing what this model does not implement: another
    architecture (model_type), Baichuan's layouts (the 7B's fused W_pack, which convert.py
    turns into ours; the 13B's ALiBi, which no code here runs), RoPE scaling, biases."""
    model_type = hf.get("model_type", "llama")
    if model_type == "baichuan":
        if "max_position_embeddings" not in hf:  # Baichuan-13B's config: model_max_length, ALiBi
            raise CheckpointError(
                f"{source}: model_type 'baichuan' with model_max_length and no max_position_embeddings is "
                "Baichuan-13B's layout, whose attention uses ALiBi, not RoPE: model.py does not implement it"
            )
        raise CheckpointError(
            f"{source}: model_type 'baichuan' (Baichuan-7B's layout, q, k and v fused in W_pack): convert it "
            "first, `python convert.py --src DIR --out NEW_DIR`"
        )
    if model_type != "llama":
        raise CheckpointError(f"{source}: model_type {model_type!r} is not LLaMA's, the one model.py implements")
    unsupported = {
        "hidden_act": lambda v: v not in (None, "silu"),
        "attention_bias": bool,
        "mlp_bias": bool,
        "pretraining_tp": lambda v: v not in (None, 1),
    }
    for key, bad in unsupported.items():
        if key in hf and bad(hf[key]):
            raise CheckpointError(f"{source}: {key}={hf[key]!r} is not supported by model.py")
    # The RoPE base: older configs write `rope_theta` at the top level, newer ones (transformers
    # 5) nest it in `rope_parameters`. Only the original (un-scaled) RoPE is implemented, and
    # a config may carry both spellings: each is checked, so neither hides a scaling.
    for key in ("rope_parameters", "rope_scaling"):
        rope = hf.get(key) or {}
        if rope.get("rope_type", rope.get("type", "default")) != "default":
            raise CheckpointError(f"{source}: RoPE scaling {key}={rope!r} is not supported by model.py")
    theta = (hf.get("rope_parameters") or {}).get("rope_theta", hf.get("rope_theta", 10000.0))
    known = {f.name for f in fields(ModelConfig)} - {"rope_theta"}
    kwargs = {k: v for k, v in hf.items() if k in known and v is not None}
    if isinstance(kwargs.get("eos_token_id"), list):  # some configs list several eos ids
        kwargs["eos_token_id"] = kwargs["eos_token_id"][0]
    kwargs.setdefault("num_key_value_heads", hf.get("num_attention_heads", ModelConfig.num_key_value_heads))
    for required in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
        if required not in hf:
            raise CheckpointError(f"{source}: missing required field {required!r}")
    if isinstance(theta, bool) or not isinstance(theta, (int, float)):
        raise CheckpointError(f"{source}: rope_theta must be a number, got {theta!r}")
    try:
        return ModelConfig(**kwargs, rope_theta=float(theta))
    except ValueError as e:
        raise CheckpointError(f"{source}: {e}") from None


def read_config(path: str | os.PathLike) -> ModelConfig:
    """A config.json, read and checked (config_from_hf)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(not_a_model(path.parent))
    try:
        hf = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    return config_from_hf(hf, source=str(path))


def config_to_hf(config: ModelConfig) -> dict:
    """The config.json that transformers' LlamaForCausalLM reads (both RoPE spellings)."""
    hf = asdict(config)
    hf.update(
        architectures=["LlamaForCausalLM"],
        model_type="llama",
        hidden_act="silu",
        attention_bias=False,
        mlp_bias=False,
        rope_parameters={"rope_type": "default", "rope_theta": config.rope_theta},
        torch_dtype="float32",
    )
    return hf


def load_config(spec: str | os.PathLike, *, builtin: bool = True) -> ModelConfig:
    """The config of the model a command line names: an HF-format directory or, where `builtin`
    allows it, one of CONFIGS by name (a directory of that name wins)."""
    if builtin and str(spec) in CONFIGS and not Path(spec).is_dir():
        return CONFIGS[str(spec)]
    if not (Path(spec) / "config.json").is_file():
        raise FileNotFoundError(not_a_model(Path(spec), list(CONFIGS) if builtin else None))
    return read_config(Path(spec) / "config.json")


# ----------------------------------------------------------------------------------------------
# Tensor names


def hf_name(name: str) -> str:
    """Our parameter name -> the Hugging Face checkpoint name (the only difference: `model.`)."""
    return name if name.startswith("lm_head.") else f"model.{name}"


def our_names(tensors: dict, config: ModelConfig, prefix: str = "") -> dict:
    """{HF name: tensor} -> {our name: tensor} (hf_name undone, `prefix` before each), a tied
    head given the embedding."""
    out = {prefix + name.removeprefix("model."): t for name, t in tensors.items()}
    if config.tie_word_embeddings and f"{prefix}embed_tokens.weight" in out:
        out[f"{prefix}lm_head.weight"] = out[f"{prefix}embed_tokens.weight"]
    return out


def expected_shapes(config: ModelConfig) -> dict[str, tuple]:
    """The HF names and shapes of every tensor a checkpoint of `config` holds."""
    with torch.device("meta"):
        model = Transformer(config)
    shapes = {hf_name(n): tuple(t.shape) for n, t in model.state_dict().items()}
    if config.tie_word_embeddings:
        shapes.pop("lm_head.weight")
    return shapes


def check_tensors(config: ModelConfig, found: dict, where: Path, expected: dict | None = None, complete: bool = True):
    """checkpoint.check_shapes against what `config` implies (expected_shapes, or `expected`).
    A tied head stored beside the embedding, as some checkpoints store it, is let be."""
    if config.tie_word_embeddings:
        found = {k: v for k, v in found.items() if k != "lm_head.weight"}
    what = f"the {config.num_hidden_layers}-layer LLaMA its config.json describes"
    check_shapes(found, expected_shapes(config) if expected is None else expected, where, what, complete=complete)


# ----------------------------------------------------------------------------------------------
# The causal LM: LlamaForCausalLM's layout


def load_transformer(path: str | os.PathLike, dtype=torch.float32, device="cpu") -> Transformer:
    """Load an HF-format directory: config.json + model.safetensors or a sharded index.

    The model is built on the meta device (no memory) and each shard's tensors are read,
    checked against the config, converted to `dtype` and assigned, one shard at a time
    (read_transformer).
    """
    config = read_config(Path(path) / "config.json")
    with torch.device("meta"):
        model = Transformer(config)
    for tensors in read_transformer(path, dtype=dtype, device=device):
        model.load_state_dict(tensors, strict=False, assign=True)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    return model


def read_transformer(path: str | os.PathLike, dtype=torch.float32, device="cpu"):
    """An HF-format checkpoint's tensors, one shard file at a time: yields {our name: tensor}
    for each file, converted to `dtype` (checkpoint.read_tensors), so that a reader holds at
    most one file's tensors. Every file's header is checked against config.json before any
    data is read; a tied head is yielded with the embedding, as the same tensor."""
    path = Path(path)
    config = read_config(path / "config.json")
    shards, found = read_headers(path)
    expected = expected_shapes(config)
    check_tensors(config, found, path, expected)
    for tensors in read_tensors(shards, expected, dtype=dtype, device=device):
        yield our_names(tensors, config)


def save_transformer(
    model: Transformer,
    path: str | os.PathLike,
    *,
    tokenizer: str | os.PathLike | None = None,
    state_dict: dict | None = None,
    max_shard_bytes: int = 5 * 2**30,
    extra_files: dict[str, bytes] | None = None,
    dtype: torch.dtype | None = None,
):
    """Write config.json, safetensors (sharded above max_shard_bytes) and the tokenizer.

    `state_dict` lets a distributed trainer pass a gathered full state dict; `extra_files`
    (name -> bytes) go into the same directory, inside the same atomic rename; `dtype`
    (None: the weights' own) is what the tensors are written in, after LoRA is merged.
    """
    sd = as_dtype(merge_lora(model, model.state_dict() if state_dict is None else state_dict), dtype)
    tensors = {hf_name(n): t for n, t in sd.items()}
    if model.config.tie_word_embeddings:
        tensors.pop("lm_head.weight", None)
    write_checkpoint(
        path,
        config_to_hf(model.config),
        [tensors],
        tokenizer=tokenizer,
        max_shard_bytes=max_shard_bytes,
        extra_files=extra_files,
    )


# ----------------------------------------------------------------------------------------------
# The reward model: LlamaForSequenceClassification's layout, and our legacy one


def reward_labels(hf: dict) -> int:
    """How many labels transformers reads a classifier's config.json as having (its
    PretrainedConfig.__init__, v5.24): len(id2label) when given, else num_labels, else 2."""
    if hf.get("id2label") is not None:
        return len(hf["id2label"])
    return hf["num_labels"] if hf.get("num_labels") is not None else 2


def reward_meta(prompt_format: str, bias: torch.Tensor | None = None) -> dict:
    """reward_config.json: how a pair is rendered for the model and where its score is read."""
    meta = {
        "score_token": "the eos that ends the reply",
        "format": prompt_format,
        "template": REWARD_FORMATS[prompt_format],
    }
    if bias is not None:
        meta["score_bias"] = float(bias.reshape(-1)[0])
        meta["note"] = "score.bias: transformers' LlamaForSequenceClassification has none and scores this much lower"
    return meta


def reward_format(path: Path) -> str:
    """The prompt format a reward model's reward_config.json names; "huatuo" (data.template's,
    as train_rm.py trains) where it names none or the checkpoint has no such file."""
    file = Path(path) / "reward_config.json"
    if not file.is_file():
        return "huatuo"
    try:
        fmt = json.loads(file.read_text(encoding="utf-8")).get("format", "huatuo")
    except (ValueError, AttributeError) as e:
        raise CheckpointError(f"{file}: not a readable reward config ({e})") from None
    if fmt not in REWARD_FORMATS:
        raise CheckpointError(f"{file}: format {fmt!r} is none of {', '.join(REWARD_FORMATS)}")
    return fmt


def save_reward_model(rm: RewardModel, path, *, tokenizer=None, state_dict=None, extra_files=None, dtype=None, **kw):
    """The Hugging Face reward-model layout, LlamaForSequenceClassification's (TRL's and
    OpenRLHF's reward models are saved so): the trunk's tensors under `model.`, the head as
    `score.weight`, num_labels 1, no LM head (a score never reads it). transformers scores at
    the last token that is not pad_token_id, which is the reply's eos when a batch is
    right-padded, as ours reads it from the mask. A head with a bias (the released HuatuoGPT
    reward model's, convert.py) writes it as `score.bias`, which model.py reads and
    LlamaForSequenceClassification (no bias) reports as an unexpected key and does not add:
    its scores are ours less that constant, the same order and the same pairwise
    differences; reward_config.json and the card give the value."""
    sd = as_dtype(merge_lora(rm, rm.state_dict() if state_dict is None else state_dict), dtype)
    tensors = {
        hf_name(k.removeprefix("trunk.")): v
        for k, v in sd.items()
        if k.startswith("trunk.") and k != "trunk.lm_head.weight"
    }
    tensors["score.weight"] = sd["score_head.weight"]
    if "score_head.bias" in sd:
        tensors["score.bias"] = sd["score_head.bias"]
    hf = dict(
        config_to_hf(rm.config),
        architectures=["LlamaForSequenceClassification"],
        num_labels=1,
        id2label={"0": "LABEL_0"},
        label2id={"LABEL_0": 0},
    )
    meta = reward_meta(rm.prompt_format, sd.get("score_head.bias"))
    write_checkpoint(
        path,
        hf,
        [tensors],
        tokenizer=tokenizer,
        extra_files={**(extra_files or {}), "reward_config.json": (json.dumps(meta, indent=2) + "\n").encode()},
    )


def load_reward_model(path, dtype=torch.float32, device="cpu") -> RewardModel:
    """A reward model in the HF layout (save_reward_model's, with `score.bias` where the head has
    one; one transformers' LlamaForSequenceClassification wrote; the released HuatuoGPT
    reward model once convert.py has turned its LlamaRewardModel layout into this), or in
    the legacy layout. Tensors are checked against config.json from the headers before any
    data is read, as load_transformer does."""
    path = Path(path)
    if (path / "score_head.safetensors").is_file():
        return _legacy_reward_model(path, dtype, device)
    config = read_config(path / "config.json")
    with torch.device("meta"):
        rm = RewardModel(config, bias=reward_has_bias(path), prompt_format=reward_format(path))
    if not config.tie_word_embeddings:
        rm.trunk.lm_head = None
    for tensors in read_reward_model(path, dtype=dtype, device=device):
        rm.load_state_dict(tensors, strict=False, assign=True)
    if config.tie_word_embeddings:
        rm.trunk.lm_head.weight = rm.trunk.embed_tokens.weight
    return rm


def read_reward_model(path, dtype=torch.float32, device="cpu"):
    """The reward model's tensors one shard file at a time, as read_transformer yields a causal
    LM's: {our name: tensor} per file, without an LM head (a score never reads it). The legacy
    layout (score_head.safetensors) comes as one group."""
    path = Path(path)
    if (path / "score_head.safetensors").is_file():
        rm = _legacy_reward_model(path, dtype, device).scorer()
        yield rm.state_dict()
        return
    config = read_config(path / "config.json")
    expected = {k: v for k, v in expected_shapes(config).items() if k != "lm_head.weight"}
    expected["score.weight"] = (1, config.hidden_size)
    shards, found = read_headers(path)
    found.pop("lm_head.weight", None)  # an LM head saved beside the score: never read
    if "score.bias" in found:
        expected["score.bias"] = (1,)
    if "score.weight" not in found:
        raise CheckpointError(f"{path}: not a reward model checkpoint (no score.weight, no score_head.safetensors)")
    labels = reward_labels(json.loads((path / "config.json").read_text(encoding="utf-8")))
    if labels != 1:  # a classifier's head, read as transformers reads its config
        raise CheckpointError(
            f"{path / 'config.json'}: {labels} labels (id2label, num_labels); a reward "
            "model needs one label, a single score"
        )
    check_tensors(config, found, path, expected)
    for tensors in read_tensors(shards, expected, dtype=dtype, device=device):
        head = {f"score_head.{k}": tensors.pop(f"score.{k}") for k in ("weight", "bias") if f"score.{k}" in tensors}
        yield {**our_names(tensors, config, prefix="trunk."), **head}


def reward_has_bias(path) -> bool:
    """Whether the checkpoint's head has a bias (`score.bias`), from the headers alone."""
    path = Path(path)
    return not (path / "score_head.safetensors").is_file() and "score.bias" in read_headers(path)[1]


def _legacy_reward_model(path: Path, dtype, device) -> RewardModel:
    """Legacy: our layout before the HF one, a causal LM with score_head.safetensors beside it."""
    trunk = load_transformer(path, dtype=dtype, device=device)
    head_file = path / "score_head.safetensors"
    with torch.device("meta"):
        rm = RewardModel(trunk.config)
    rm.trunk = trunk
    rm.trunk.lm_head.requires_grad_(False)
    weight = load_safetensors(head_file.read_bytes())["weight"].to(dtype)
    if weight.shape != (1, trunk.config.hidden_size):
        raise ValueError(
            f"{head_file}: weight has shape {tuple(weight.shape)}, expected (1, {trunk.config.hidden_size})"
        )
    rm.score_head = nn.Linear(trunk.config.hidden_size, 1, bias=False, dtype=dtype, device=device)
    rm.score_head.weight.data.copy_(weight)
    return rm


# ----------------------------------------------------------------------------------------------
# PPO's policy: the causal LM and its value head


def save_policy(model: PolicyWithValue, path, *, tokenizer=None, state_dict=None, extra_files=None, dtype=None, **kw):
    """The policy as a causal LM (save_transformer) and value_head.safetensors beside it."""
    sd = model.state_dict() if state_dict is None else state_dict
    policy = {k.removeprefix("policy."): v for k, v in sd.items() if k.startswith("policy.")}
    head = save_safetensors({"weight": sd["value_head.weight"].detach().cpu().contiguous()})
    save_transformer(
        model.policy,
        path,
        tokenizer=tokenizer,
        state_dict=policy,
        extra_files={**(extra_files or {}), "value_head.safetensors": head},
    )


def save_model(model: nn.Module, path, **kwargs):
    """Write `model` in its own layout: a PolicyWithValue (save_policy), a RewardModel
    (save_reward_model) or a Transformer (save_transformer); keyword arguments as theirs."""
    if isinstance(model, PolicyWithValue):
        return save_policy(model, path, **kwargs)
    if isinstance(model, RewardModel):
        return save_reward_model(model, path, **kwargs)
    return save_transformer(model, path, **kwargs)
