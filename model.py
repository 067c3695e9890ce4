"""A LLaMA written out by hand, loading and saving Hugging Face-format checkpoints.

HuatuoGPT starts from Ziya-LLaMA-13B-Pretrain (paper App. E), a LLaMA-13B continued-pretrained
on Chinese. This file holds everything needed to run such a model, in this order (each part under a
banner comment):

    Configuration    ModelConfig, read from / written to an HF `config.json`; the named configs
    The network      RMSNorm, RoPE, KVCache, Attention, MLP, Block, and Transformer: embed ->
                     layers -> norm -> lm_head, with from_pretrained (streamed shard by shard)
                     and save_pretrained (the layout `transformers` opens unchanged)
    Built on it      RewardModel (the trunk and a scalar head at the reply's eos, in the HF
                     reward-model layout) and PolicyWithValue (PPO's policy and value head)
    HF names         hf_name, expected_shapes, check_tensors and our_names: the checkpoint's
                     tensor names mapped onto these modules

The files themselves (shards, headers, the atomic writer) are checkpoint.py's; LoRA's adapters,
which save_pretrained folds into the weights, are lora.py's.

Module and tensor names follow Hugging Face's (`q_proj`, `gate_proj`, `input_layernorm`, ...),
so a checkpoint maps onto this model by adding the prefix `model.` (see `hf_name`).
Sampling lives in generate.py, the tokenizer in tokenizer.py.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint
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
from data.template import REWARD_FORMATS, pad_batch
from lora import merge_lora


# ----------------------------------------------------------------------------------------------
# Configuration


# Bounds a config's sizes must keep (ModelConfig checks them first): far beyond any LLaMA, small
# enough that a typo cannot make a loader build a model without end.
LIMITS = {
    "vocab_size": 1 << 22,
    "hidden_size": 1 << 17,
    "intermediate_size": 1 << 19,
    "num_hidden_layers": 1024,
    "num_attention_heads": 1024,
    "num_key_value_heads": 1024,
    "head_dim": 4096,
    "max_position_embeddings": 1 << 21,
}


@dataclass
class ModelConfig:
    """LLaMA hyperparameters. Field names are the keys of an HF LlamaForCausalLM config.json."""

    vocab_size: int = 39424  # Ziya: 39,424 embedding rows for a 39,410-piece tokenizer
    hidden_size: int = 5120
    intermediate_size: int = 13824
    num_hidden_layers: int = 40
    num_attention_heads: int = 40
    num_key_value_heads: int = 40  # == heads: plain multi-head attention; fewer: grouped-query
    head_dim: int | None = None  # None: hidden_size // num_attention_heads
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    tie_word_embeddings: bool = False
    initializer_range: float = 0.02
    bos_token_id: int = 1
    eos_token_id: int = 2
    pad_token_id: int = 0

    def __post_init__(self):
        # Checked before anything is allocated, so that a wrong size is one message naming it,
        # not a model built without end or an error deep inside. The bounds are far beyond any
        # LLaMA.
        for name, limit in LIMITS.items():
            value = getattr(self, name)
            if name == "head_dim" and value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= limit:
                raise ValueError(f"{name} must be an integer from 1 to {limit:,}, got {value!r}")
        for name in ("rms_norm_eps", "rope_theta", "initializer_range"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < float("inf"):
                raise ValueError(f"{name} must be a positive number, got {value!r}")
        if not isinstance(self.tie_word_embeddings, bool):
            raise ValueError(f"tie_word_embeddings must be true or false, got {self.tie_word_embeddings!r}")
        for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
            value = getattr(self, name)
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < self.vocab_size
            ):
                raise ValueError(f"{name} must be a token id below vocab_size {self.vocab_size}, got {value!r}")
        if self.head_dim is None:
            if self.hidden_size % self.num_attention_heads:
                raise ValueError(
                    f"hidden_size ({self.hidden_size}) must be a multiple of num_attention_heads "
                    f"({self.num_attention_heads}), or head_dim given"
                )
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for rotary embeddings, got {self.head_dim}")

    @classmethod
    def from_hf(cls, hf: dict, source: str = "config.json") -> "ModelConfig":
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
        known = {f.name for f in fields(cls)} - {"rope_theta"}
        kwargs = {k: v for k, v in hf.items() if k in known and v is not None}
        if isinstance(kwargs.get("eos_token_id"), list):  # some configs list several eos ids
            kwargs["eos_token_id"] = kwargs["eos_token_id"][0]
        kwargs.setdefault("num_key_value_heads", hf.get("num_attention_heads", cls.num_key_value_heads))
        for required in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
            if required not in hf:
                raise CheckpointError(f"{source}: missing required field {required!r}")
        if isinstance(theta, bool) or not isinstance(theta, (int, float)):
            raise CheckpointError(f"{source}: rope_theta must be a number, got {theta!r}")
        try:
            return cls(**kwargs, rope_theta=float(theta))
        except ValueError as e:
            raise CheckpointError(f"{source}: {e}") from None

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> "ModelConfig":
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(not_a_model(path.parent))
        try:
            hf = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{path}: not valid JSON ({e})") from None
        return cls.from_hf(hf, source=str(path))

    def to_hf(self) -> dict:
        """The config.json that transformers' LlamaForCausalLM reads (both RoPE spellings)."""
        hf = asdict(self)
        hf.update(
            architectures=["LlamaForCausalLM"],
            model_type="llama",
            hidden_act="silu",
            attention_bias=False,
            mlp_bias=False,
            rope_parameters={"rope_type": "default", "rope_theta": self.rope_theta},
            torch_dtype="float32",
        )
        return hf

    def num_params(self) -> int:
        h, f, v, hd = self.hidden_size, self.intermediate_size, self.vocab_size, self.head_dim
        attn = h * hd * (2 * self.num_attention_heads + 2 * self.num_key_value_heads)
        per_layer = attn + 3 * h * f + 2 * h
        return v * h * (1 if self.tie_word_embeddings else 2) + self.num_hidden_layers * per_layer + h


# Named configurations. `tiny` is the embedded default: a few million parameters that train on a
# laptop CPU in minutes, with an embedding table larger than its tokenizer, as Ziya's is.
CONFIGS = {
    "tiny": ModelConfig(
        vocab_size=4096,
        hidden_size=256,
        intermediate_size=688,
        num_hidden_layers=4,
        # LLaMA's context (paper App. E: 2048): the judge's prompt (App. D) alone is ~1,500 tiny tokens.
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=2048,
    ),
    # ~50M parameters: the size the benchmarks in bench/ compare against transformers.
    "bench-50m": ModelConfig(
        vocab_size=8192,
        hidden_size=512,
        intermediate_size=1376,
        num_hidden_layers=12,
        num_attention_heads=8,
        num_key_value_heads=8,
        max_position_embeddings=2048,
    ),
    # Ziya-LLaMA-13B (the dataclass defaults), the base model of the paper (App. E).
    "ziya-13b": ModelConfig(),
}


def load_config(spec: str | os.PathLike, *, builtin: bool = True) -> ModelConfig:
    """The config of the model a command line names: an HF-format directory or, where `builtin`
    allows it, one of CONFIGS by name (a directory of that name wins)."""
    if builtin and str(spec) in CONFIGS and not Path(spec).is_dir():
        return CONFIGS[str(spec)]
    if not (Path(spec) / "config.json").is_file():
        raise FileNotFoundError(not_a_model(Path(spec), list(CONFIGS) if builtin else None))
    return ModelConfig.from_json(Path(spec) / "config.json")


# ----------------------------------------------------------------------------------------------
# The network


class RMSNorm(nn.Module):
    """x / rms(x) * weight, computed in fp32 and cast back before the weight, as HF does."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype):
    """cos and sin of the rotary angles for integer positions (B, T) -> (B, 1, T, head_dim).

    RoPE layout: Hugging Face stores q_proj/k_proj rows so that dimension i is paired with
    dimension i + head_dim/2 ("rotate half"), not with its neighbour i+1 as in Meta's original
    code. We use the rotate-half layout directly, so HF weights load with no permutation.
    Angles are computed in fp32 and only then cast: in bf16 position 2000 would be off by ~8.
    """
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=positions.device).float() / head_dim)
    angles = positions.float()[..., None] * inv_freq  # (B, T, head_dim/2)
    angles = torch.cat([angles, angles], dim=-1)[:, None]  # (B, 1, T, head_dim)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


class KVCache:
    """Keys and values of every layer, preallocated for `max_len` positions.

    All sequences of a batch share one write position (`start` in forward), which is what left
    padding buys: the prompts end together, so each decoding step writes one column.
    Each layer's buffers are allocated at its first write, in the dtype and on the device of the
    keys written: that is the dtype the layers compute in, which under FSDP mixed precision
    (bf16) differs from that of the stored fp32 weights. One tensor per layer, so that a
    compiled step (generate.py --compile) updates each in place.

    `start` an int: write columns start.. and return the keys and values up to the last one
    written. `start` a tensor (the static cache of a compiled step): write the one column it
    holds and return all max_len columns; the attention mask hides those not written yet.
    `start` a (B, 1) tensor, a column per row (serve.py's slots, each row at its own length):
    rows 0..B-1 of the cache each write their column, and the first `width` columns (the
    mask's) come back.
    """

    def __init__(self, config: ModelConfig, batch_size: int, max_len: int):
        self.shape = (batch_size, config.num_key_value_heads, max_len, config.head_dim)
        self.k = [None] * config.num_hidden_layers
        self.v = [None] * config.num_hidden_layers
        self.max_len = max_len

    def copy_row(self, row: int, source: "KVCache", source_row: int, columns: int):
        """Row `row`'s first `columns` columns := those of `source`'s row `source_row`, every layer
        (a layer not written yet takes the source's dtype and device)."""
        for layer in range(len(self.k)):
            if self.k[layer] is None:
                self.k[layer] = source.k[layer].new_zeros(self.shape)
                self.v[layer] = source.v[layer].new_zeros(self.shape)
            self.k[layer][row, :, :columns] = source.k[layer][source_row, :, :columns]
            self.v[layer][row, :, :columns] = source.v[layer][source_row, :, :columns]

    def update(self, layer: int, start: int | torch.Tensor, k: torch.Tensor, v: torch.Tensor, width: int | None = None):
        if isinstance(start, torch.Tensor) and start.dim() == 2:  # (B, 1): a column per row
            rows = torch.arange(k.shape[0], device=k.device)
            self.k[layer][rows, :, start[:, 0]] = k[:, :, 0]
            self.v[layer][rows, :, start[:, 0]] = v[:, :, 0]
            return self.k[layer][: k.shape[0], :, :width], self.v[layer][: k.shape[0], :, :width]
        if isinstance(start, torch.Tensor):
            self.k[layer].index_copy_(2, start, k)
            self.v[layer].index_copy_(2, start, v)
            return self.k[layer], self.v[layer]
        end = start + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} positions, asked to write up to {end}")
        if self.k[layer] is None:
            self.k[layer], self.v[layer] = k.new_zeros(self.shape), v.new_zeros(self.shape)
        self.k[layer][:, :, start:end] = k
        self.v[layer][:, :, start:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv_heads, self.head_dim = (
            config.num_attention_heads,
            config.num_key_value_heads,
            config.head_dim,
        )
        width = config.hidden_size
        self.q_proj = nn.Linear(width, self.n_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(width, self.n_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(width, self.n_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, width, bias=False)

    def forward(self, x, ctx: "AttentionContext", cache: KVCache | None = None):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, ctx.cos, ctx.sin), apply_rope(k, ctx.cos, ctx.sin)
        if cache is not None:
            k, v = cache.update(self.layer_idx, ctx.start, k, v, None if ctx.mask is None else ctx.mask.shape[-1])
        # Grouped-query attention: each key/value head serves n_heads / n_kv_heads query heads.
        # SDPA's softmax accumulates in fp32 whatever the input dtype.
        y = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=ctx.mask,
            is_causal=ctx.mask is None and T > 1,
            enable_gqa=self.n_kv_heads != self.n_heads,
        )
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, layer_idx)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x, ctx: "AttentionContext", cache: KVCache | None = None):
        x = x + self.self_attn(self.input_layernorm(x), ctx, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


@dataclass
class AttentionContext:
    """What every layer needs besides its input: rotary angles, the mask, the cache position."""

    cos: torch.Tensor
    sin: torch.Tensor
    mask: torch.Tensor | None  # bool (B, 1, T, S), True = may attend; None = plain causal
    start: int | torch.Tensor  # a tensor: the column of a static cache (KVCache.update)


class Transformer(nn.Module):
    """LLaMA: embed_tokens -> layers -> norm -> lm_head.

    `forward` runs the whole stack or any slice of it (PPO runs the frozen bottom layers once
    and the top layers twice; the reward model reads the final hidden state). Every partial
    forward goes through `forward`, never through the submodules from outside: under FSDP the
    root module's hooks gather the embedding, final norm and head only when its own forward
    runs, so `model.embed_tokens(x)` called directly meets sharded weights.
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        # Activation checkpointing: keep only each block's input during the forward pass and
        # recompute the block during backward (~1/3 more compute, far less activation memory).
        self.activation_checkpointing = False
        # generate.decode_steps runs each decoding step through torch.compile over a static
        # cache (generate.compiled_step, --compile).
        self.compile_decoding = False

    @torch.no_grad()
    def init_weights(self, seed: int | None = None):
        """Random initialisation as HF LLaMA does it: N(0, initializer_range), norms at 1."""
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        for name, p in self.named_parameters():
            if name.endswith("layernorm.weight") or name == "norm.weight":
                p.fill_(1.0)
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * self.config.initializer_range)
        return self

    def context(
        self,
        batch_size: int,
        seq_len: int,
        attention_mask=None,
        start: int | torch.Tensor = 0,
        device=None,
        dtype=torch.float32,
    ) -> AttentionContext:
        """Positions and mask for `seq_len` new tokens written at cache position `start`.

        attention_mask: (B, start + seq_len), 1 for real tokens and 0 for padding (left or
        right), covering everything in the cache so far. Positions count real tokens only, so a
        left-padded prompt sees the same positions as the same prompt alone.
        """
        if isinstance(start, torch.Tensor):
            # One token over a static cache (KVCache.update): attention_mask spans the whole
            # cache, 1 up to and including the new token's column and 0 after it, so the count
            # of 1s gives the position and the mask itself says what may be attended to. No
            # shape here depends on the step, so one compilation serves every step.
            if seq_len != 1 or attention_mask is None:
                raise ValueError("a tensor start (static cache) takes one token and an attention_mask")
            positions = attention_mask.sum(-1, keepdim=True) - 1
            mask = attention_mask.bool()[:, None, None, :]
        elif attention_mask is None:
            positions = torch.arange(start, start + seq_len, device=device).expand(batch_size, -1)
            # Prefill from position 0 is plain causal attention (SDPA's fast path). Later
            # chunks attend to all cached keys plus a causal block among themselves.
            mask = None
            if start > 0 and seq_len > 1:
                mask = causal_mask(seq_len, start + seq_len, start, device)[None, None]
        else:
            am = attention_mask.bool()
            if am.shape != (batch_size, start + seq_len):
                raise ValueError(
                    f"attention_mask has shape {tuple(am.shape)}, expected {(batch_size, start + seq_len)}"
                )
            device = am.device
            positions = (am.long().cumsum(-1) - 1).clamp(min=0)[:, start:]
            mask = causal_mask(seq_len, start + seq_len, start, device)[None] & am[:, None, :]
            # A padding query would see no key at all and its softmax would be NaN; let it see
            # itself. Its output is never read and no real token attends to it.
            diag = torch.arange(seq_len, device=device)
            mask[:, diag, diag + start] = True
            mask = mask[:, None]
        cos, sin = rope_cos_sin(positions, self.config.head_dim, self.config.rope_theta, dtype)
        return AttentionContext(cos, sin, mask, start)

    def run_layers(
        self, h, ctx: AttentionContext, first: int = 0, last: int | None = None, cache: KVCache | None = None
    ):
        for layer in self.layers[first:last]:
            if self.activation_checkpointing and torch.is_grad_enabled():
                h = torch.utils.checkpoint.checkpoint(layer, h, ctx, cache, use_reentrant=False)
            else:
                h = layer(h, ctx, cache)
        return h

    def forward(
        self,
        tokens: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        *,
        cache: KVCache | None = None,
        start: int | torch.Tensor = 0,
        hidden: torch.Tensor | None = None,
        first_layer: int = 0,
        last_layer: int | None = None,
        output: str = "logits",
        positions: slice | None = None,
    ):
        """Run blocks first_layer .. last_layer-1 (all by default) on embedded `tokens` (B, T),
        or on `hidden` (B, T, hidden_size): the residual stream entering block first_layer, as
        an earlier call with output="residual" returned it. What comes out:

            "logits"    final norm, then lm_head: (B, T, vocab_size) in the compute dtype
            "hidden"    the final normed hidden states (B, T, hidden_size)
            "residual"  the residual stream after the last block run, no norm (B, T, hidden_size)

        Slicing is exact: forward(output="residual", last_layer=k) then forward(hidden=...,
        first_layer=k) computes what one full forward does, operation for operation. positions
        (a slice) returns those positions only, (B, len, ...), and the final norm and the head
        run on them alone: a prefill needs the last (the logits of every position of 8 prompts of
        1,024 tokens are 1.2 GiB in fp32 at Ziya's vocabulary), PPO the response's.
        """
        if (tokens is None) == (hidden is None):
            raise ValueError("give exactly one of tokens and hidden")
        if output not in ("logits", "hidden", "residual"):
            raise ValueError(f"output must be 'logits', 'hidden' or 'residual', got {output!r}")
        h = self.embed_tokens(tokens) if hidden is None else hidden
        B, T = h.shape[:2]
        ctx = self.context(B, T, attention_mask, start, h.device, h.dtype)
        h = self.run_layers(h, ctx, first_layer, last_layer, cache=cache)
        if positions is not None:
            h = h[:, positions]
        if output == "residual":
            return h
        h = self.norm(h)
        return h if output == "hidden" else self.lm_head(h)

    # -- checkpoints ---------------------------------------------------------------------------

    @classmethod
    def from_config(cls, config: ModelConfig | str, dtype=torch.float32, device="cpu", seed: int = 0):
        """A randomly initialised model; `config` may name one of CONFIGS."""
        if isinstance(config, str):
            if config not in CONFIGS:
                raise ValueError(f"unknown model config {config!r}; known: {sorted(CONFIGS)}")
            config = CONFIGS[config]
        model = cls(config).init_weights(seed)
        return model.to(device=device, dtype=dtype)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, dtype=torch.float32, device="cpu") -> "Transformer":
        """Load an HF-format directory: config.json + model.safetensors or a sharded index.

        The model is built on the meta device (no memory) and each shard's tensors are read,
        checked against the config, converted to `dtype` and assigned, one shard at a time
        (read_pretrained).
        """
        config = ModelConfig.from_json(Path(path) / "config.json")
        with torch.device("meta"):
            model = cls(config)
        for tensors in cls.read_pretrained(path, dtype=dtype, device=device):
            model.load_state_dict(tensors, strict=False, assign=True)
        if config.tie_word_embeddings:
            model.lm_head.weight = model.embed_tokens.weight
        return model

    @classmethod
    def read_pretrained(cls, path: str | os.PathLike, dtype=torch.float32, device="cpu"):
        """An HF-format checkpoint's tensors, one shard file at a time: yields {our name: tensor}
        for each file, converted to `dtype` (checkpoint.read_tensors), so that a reader holds at
        most one file's tensors. Every file's header is checked against config.json before any
        data is read; a tied head is yielded with the embedding, as the same tensor."""
        path = Path(path)
        config = ModelConfig.from_json(path / "config.json")
        shards, found = read_headers(path)
        expected = expected_shapes(config)
        check_tensors(config, found, path, expected)
        for tensors in read_tensors(shards, expected, dtype=dtype, device=device):
            yield our_names(tensors, config)

    def save_pretrained(
        self,
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
        sd = as_dtype(merge_lora(self, self.state_dict() if state_dict is None else state_dict), dtype)
        tensors = {hf_name(n): t for n, t in sd.items()}
        if self.config.tie_word_embeddings:
            tensors.pop("lm_head.weight", None)
        write_checkpoint(
            path,
            self.config.to_hf(),
            [tensors],
            tokenizer=tokenizer,
            max_shard_bytes=max_shard_bytes,
            extra_files=extra_files,
        )


def allocate(module: nn.Module, *, device, dtype) -> nn.Module:
    """A meta-device module's weights allocated on `device` in `dtype`, uninitialised (to be
    loaded); a tied head stays tied."""
    fresh = {}
    for name, t in module.state_dict(keep_vars=True).items():
        fresh[name] = torch.empty(t.shape, dtype=dtype, device=device)
    module.load_state_dict(fresh, assign=True)
    for m in module.modules():
        if isinstance(m, Transformer) and m.config.tie_word_embeddings and m.embed_tokens is not None:
            m.lm_head.weight = m.embed_tokens.weight
    return module


def causal_mask(q_len: int, k_len: int, start: int, device) -> torch.Tensor:
    """(q_len, k_len) bool: query i (at absolute position start + i) sees keys 0..start + i."""
    q = torch.arange(start, start + q_len, device=device)[:, None]
    return torch.arange(k_len, device=device)[None, :] <= q


def at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    """x in fp32 if it is narrower (bf16 logits, scores), as it is otherwise (fp32; fp64, the
    dtype of the exactness tests, which an fp32 cast would round)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log p(target) under `logits`: (..., V) and (...) -> (...), in fp32 or wider.

    The one definition of a token's log-probability in this project: sampling's log-probs,
    PPO's ratio and its KL penalty all come from here, so that they agree exactly. The softmax
    runs over the full vocabulary (no sampling filter, no vocab_limit mask) and in fp32 at least
    whatever the logits' dtype: a bf16 log-softmax would put errors of ~0.01 nats into every
    ratio. (fp64 logits stay fp64, for exactness tests.)
    """
    logits = at_least_fp32(logits)
    return logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - logits.logsumexp(-1)


def hf_name(name: str) -> str:
    """Our parameter name -> the Hugging Face checkpoint name (the only difference: `model.`)."""
    return name if name.startswith("lm_head.") else f"model.{name}"


# ----------------------------------------------------------------------------------------------
# The models built on it: the reward model (train_rm.py) and the policy with its value head (train_ppo.py)

TRAINABLE_BLOCKS = 2  # paper App. E: "only the parameters of the last two layers are updated" in RL


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


class RewardModel(nn.Module):
    """A LLaMA trunk and a scalar head read at the last real token (the reply's eos). The head
    has a bias only where a checkpoint brings one (the released HuatuoGPT reward model's
    value_head, converted by convert.py); `prompt_format` names how a pair is rendered for it
    (data.template.REWARD_FORMATS), as its reward_config.json says."""

    def __init__(self, config, bias: bool = False, prompt_format: str = "huatuo"):
        super().__init__()
        self.trunk = Transformer(config)
        self.trunk.lm_head.requires_grad_(False)  # kept for the HF layout, never used for rewards
        self.score_head = nn.Linear(config.hidden_size, 1, bias=bias)
        self.prompt_format = prompt_format

    @property
    def layers(self):
        return self.trunk.layers

    @property
    def config(self):
        return self.trunk.config

    def forward(self, tokens: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """tokens, attention_mask (B, T) -> rewards (B,), read at each row's last real token, in
        fp32 or wider (bf16 scores come back fp32; an fp64 model's stay fp64)."""
        hidden = self.trunk(tokens, attention_mask, output="hidden")
        last = attention_mask.shape[1] - 1 - attention_mask.flip(-1).argmax(-1)  # left or right padding
        h = hidden[torch.arange(tokens.shape[0], device=tokens.device), last]
        return at_least_fp32(self.score_head(h)[:, 0]).clone()  # a fresh tensor, not a view (FSDP hooks)

    def save_pretrained(self, path, *, tokenizer=None, state_dict=None, extra_files=None, dtype=None, **kw):
        """The Hugging Face reward-model layout, LlamaForSequenceClassification's (TRL's and
        OpenRLHF's reward models are saved so): the trunk's tensors under `model.`, the head as
        `score.weight`, num_labels 1, no LM head (a score never reads it). transformers scores at
        the last token that is not pad_token_id, which is the reply's eos when a batch is
        right-padded, as ours reads it from the mask. A head with a bias (the released HuatuoGPT
        reward model's, convert.py) writes it as `score.bias`, which model.py reads and
        LlamaForSequenceClassification (no bias) reports as an unexpected key and does not add:
        its scores are ours less that constant, the same order and the same pairwise
        differences; reward_config.json and the card give the value."""
        sd = as_dtype(merge_lora(self, self.state_dict() if state_dict is None else state_dict), dtype)
        tensors = {
            hf_name(k.removeprefix("trunk.")): v
            for k, v in sd.items()
            if k.startswith("trunk.") and k != "trunk.lm_head.weight"
        }
        tensors["score.weight"] = sd["score_head.weight"]
        if "score_head.bias" in sd:
            tensors["score.bias"] = sd["score_head.bias"]
        hf = dict(
            self.config.to_hf(),
            architectures=["LlamaForSequenceClassification"],
            num_labels=1,
            id2label={"0": "LABEL_0"},
            label2id={"LABEL_0": 0},
        )
        meta = reward_meta(self.prompt_format, sd.get("score_head.bias"))
        write_checkpoint(
            path,
            hf,
            [tensors],
            tokenizer=tokenizer,
            extra_files={**(extra_files or {}), "reward_config.json": (json.dumps(meta, indent=2) + "\n").encode()},
        )

    def scorer(self) -> "RewardModel":
        """This model without its LM head, which a score never reads (kept in a checkpoint for
        the HF layout): 0.4 GB less on every rank of PPO at 13B. It can score, not be saved."""
        if not self.config.tie_word_embeddings:
            self.trunk.lm_head = None
        return self

    def score_ids(
        self, prompts: list[list[int]], responses: list[list[int]], *, eos_id: int, pad_id: int
    ) -> torch.Tensor:
        """Rewards (B,) of responses given as token ids after their prompts' ids, exactly as the
        policy produced them. A response is scored at its eos, the token the head was trained
        to read. One without eos (cut off at max_new_tokens) gets one appended: it is scored as
        if it ended there, as a text reply always is (render_reply closes every reply with
        eos); whether to penalise it is the caller's choice, who knows it was cut (PPO does)."""
        device = next(self.parameters()).device
        seqs = [p + r + ([] if r and r[-1] == eos_id else [eos_id]) for p, r in zip(prompts, responses)]
        limit = self.config.max_position_embeddings
        if max(map(len, seqs)) > limit:
            raise ValueError(
                f"a prompt + response + eos of {max(map(len, seqs))} tokens exceeds the reward "
                f"model's context of {limit}"
            )
        tokens, mask = pad_batch(seqs, pad_id)
        return self(tokens.to(device), mask.to(device))

    @classmethod
    def from_pretrained(cls, path, dtype=torch.float32, device="cpu") -> "RewardModel":
        """A reward model in the HF layout (save_pretrained's, with `score.bias` where the head has
        one; one transformers' LlamaForSequenceClassification wrote; the released HuatuoGPT
        reward model once convert.py has turned its LlamaRewardModel layout into this), or in
        ours before it (a causal LM with score_head.safetensors beside it). Tensors are checked against config.json from the
        headers before any data is read, as Transformer.from_pretrained does."""
        path = Path(path)
        if (path / "score_head.safetensors").is_file():
            return cls._from_causal_lm_and_head(path, dtype, device)
        config = ModelConfig.from_json(path / "config.json")
        with torch.device("meta"):
            rm = cls(config, bias=cls.has_bias(path), prompt_format=reward_format(path))
        if not config.tie_word_embeddings:
            rm.trunk.lm_head = None
        for tensors in cls.read_pretrained(path, dtype=dtype, device=device):
            rm.load_state_dict(tensors, strict=False, assign=True)
        if config.tie_word_embeddings:
            rm.trunk.lm_head.weight = rm.trunk.embed_tokens.weight
        return rm

    @classmethod
    def read_pretrained(cls, path, dtype=torch.float32, device="cpu"):
        """The reward model's tensors one shard file at a time, as Transformer.read_pretrained
        yields a causal LM's: {our name: tensor} per file, without an LM head (a score never
        reads it). Our earlier layout (score_head.safetensors) comes as one group."""
        path = Path(path)
        if (path / "score_head.safetensors").is_file():
            rm = cls._from_causal_lm_and_head(path, dtype, device).scorer()
            yield rm.state_dict()
            return
        config = ModelConfig.from_json(path / "config.json")
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

    @staticmethod
    def has_bias(path) -> bool:
        """Whether the checkpoint's head has a bias (`score.bias`), from the headers alone."""
        path = Path(path)
        return not (path / "score_head.safetensors").is_file() and "score.bias" in read_headers(path)[1]

    @classmethod
    def _from_causal_lm_and_head(cls, path: Path, dtype, device) -> "RewardModel":
        trunk = Transformer.from_pretrained(path, dtype=dtype, device=device)
        head_file = path / "score_head.safetensors"
        with torch.device("meta"):
            rm = cls(trunk.config)
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


class PolicyWithValue(nn.Module):
    """PPO's policy (a LLaMA) and a value head on its final hidden state, as one module so that
    FSDP wraps both. The embedding and the blocks below `first_trainable` are frozen (paper App.
    E: only the last TRAINABLE_BLOCKS are updated in RL). PPO runs it in two slices:

        bottom   the frozen embedding and blocks [0, first_trainable): the residual stream that
                 enters block first_trainable, computed once per experience
        top      blocks [first_trainable, L), the norm, the head and the value head on that
                 stream: (logits, values) per position (of `positions` only, when given)

    Both are calls of forward, which is the policy's Transformer.forward with the value head
    added on request: under FSDP the root's weights (the embedding, the final norm and both
    heads) are gathered in nn.Module.__call__, so every slice goes through it."""

    def __init__(self, policy: Transformer, trainable_blocks: int = TRAINABLE_BLOCKS):
        super().__init__()
        self.policy = policy
        self.first_trainable = policy.config.num_hidden_layers - trainable_blocks
        self.value_head = nn.Linear(policy.config.hidden_size, 1, bias=False)
        policy.embed_tokens.requires_grad_(False)
        for layer in policy.layers[: self.first_trainable]:
            layer.requires_grad_(False)
        if policy.config.tie_word_embeddings:  # a tied head is the embedding, which stays frozen
            policy.lm_head.requires_grad_(False)

    @property
    def config(self):
        return self.policy.config

    @property
    def layers(self):
        return self.policy.layers

    def bottom(self, tokens, attention_mask=None) -> torch.Tensor:
        return self(tokens, attention_mask, last_layer=self.first_trainable, output="residual")

    def top(self, hidden, attention_mask=None, positions=None) -> tuple[torch.Tensor, torch.Tensor]:
        return self(
            hidden=hidden,
            attention_mask=attention_mask,
            first_layer=self.first_trainable,
            positions=positions,
            values=True,
        )

    def forward(self, tokens=None, attention_mask=None, *, values: bool = False, **kwargs):
        """Transformer.forward of the policy (its keyword arguments: a cache, a slice of the
        layers, an output); values=True: (logits, values) from the final hidden state."""
        if not values:
            return self.policy(tokens, attention_mask, **kwargs)
        h = self.policy(tokens, attention_mask, output="hidden", **kwargs)
        return self.policy.lm_head(h), self.value_head(h)[..., 0].clone()  # not a view of FSDP's output

    def save_pretrained(self, path, *, tokenizer=None, state_dict=None, extra_files=None, dtype=None, **kw):
        sd = self.state_dict() if state_dict is None else state_dict
        policy = {k.removeprefix("policy."): v for k, v in sd.items() if k.startswith("policy.")}
        head = save_safetensors({"weight": sd["value_head.weight"].detach().cpu().contiguous()})
        self.policy.save_pretrained(
            path,
            tokenizer=tokenizer,
            state_dict=policy,
            extra_files={**(extra_files or {}), "value_head.safetensors": head},
        )


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


def our_names(tensors: dict, config: ModelConfig, prefix: str = "") -> dict:
    """{HF name: tensor} -> {our name: tensor} (hf_name undone, `prefix` before each), a tied
    head given the embedding."""
    out = {prefix + name.removeprefix("model."): t for name, t in tensors.items()}
    if config.tie_word_embeddings and f"{prefix}embed_tokens.weight" in out:
        out[f"{prefix}lm_head.weight"] = out[f"{prefix}embed_tokens.weight"]
    return out


if __name__ == "__main__":  # print the named configs' sizes
    for name, cfg in CONFIGS.items():
        print(f"{name:10s} {cfg.num_params() / 1e6:10.1f}M parameters")
