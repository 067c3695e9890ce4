"""LLaMA written out by hand: the network of Ziya-LLaMA-13B, HuatuoGPT's base model (paper App. E),
and the two models PPO builds on it. In this order, each part under a banner comment:

    Configuration    ModelConfig: the fields of an HF LlamaForCausalLM config.json and the
                     invariants between them (sizes checked before anything is allocated)
    The network      RMSNorm, RoPE, KVCache, Attention, MLP, Block, and Transformer: embed ->
                     layers -> norm -> lm_head, run whole or as any slice of its layers
    Built on it      RewardModel (the trunk and a scalar head read at the reply's eos) and
                     PolicyWithValue (PPO's policy and value head); token_logprobs
    Named configs    CONFIGS: `tiny` (the embedded default), `bench-50m`, `ziya-13b`

Module and tensor names follow Hugging Face's (`q_proj`, `gate_proj`, `input_layernorm`, ...), so
a checkpoint maps onto these modules by adding the prefix `model.`. Reading and writing that
layout (config.json, the three models' checkpoints) is pretrained.py's; sampling is
generate.py's, the tokenizer tokenizer.py's.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint


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

    def num_params(self) -> int:
        h, f, v, hd = self.hidden_size, self.intermediate_size, self.vocab_size, self.head_dim
        attn = h * hd * (2 * self.num_attention_heads + 2 * self.num_key_value_heads)
        per_layer = attn + 3 * h * f + 2 * h
        return v * h * (1 if self.tie_word_embeddings else 2) + self.num_hidden_layers * per_layer + h


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

    Each layer's buffers are allocated at its first write, in the dtype and on the device of the
    keys written: that is the dtype the layers compute in, which under FSDP mixed precision
    (bf16) differs from that of the stored fp32 weights. One tensor per layer, so that a
    compiled step (generate.py --compile) updates each in place.

    Where a forward writes (`start`):
      an int             a block: rows 0..B-1 of the cache write columns start.. (a prefill, or
                         its next chunk); the keys and values up to the last column written
                         come back.
      a (B, 1) tensor    a decoding step, one token a row: each row writes the column it holds
                         (generate.CacheRows: every row at its own length); the first `width`
                         columns (the attention mask's) come back, and the mask hides the
                         columns a row has not written. One shape whatever the columns, so a
                         compiled step traces once.
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
        B = k.shape[0]
        if isinstance(start, torch.Tensor):  # (B, 1): a column per row
            # Every index a tensor over the whole buffer (row, head, column), not a slice of it:
            # a compiled step then writes in place. Through a view (cache[:B, :, col]) inductor
            # copies the whole cache each step: 1.18x the step's time at batch 8 (bench-50m).
            rows = torch.arange(B, device=k.device)[:, None]
            heads = torch.arange(k.shape[1], device=k.device)[None]
            self.k[layer].index_put_((rows, heads, start), k[:, :, 0])
            self.v[layer].index_put_((rows, heads, start), v[:, :, 0])
            return self.k[layer][:B, :, :width], self.v[layer][:B, :, :width]
        end = start + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} positions, asked to write up to {end}")
        if self.k[layer] is None:
            self.k[layer], self.v[layer] = k.new_zeros(self.shape), v.new_zeros(self.shape)
        self.k[layer][:B, :, start:end] = k
        self.v[layer][:B, :, start:end] = v
        return self.k[layer][:B, :, :end], self.v[layer][:B, :, :end]


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
    start: int | torch.Tensor  # where the forward writes (KVCache.update): a block of columns, or a column per row


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
            # One token a row, each written at its own column (KVCache.update): attention_mask
            # spans the cache's columns, 1 where a row holds a token (the new one included) and
            # 0 for padding and the columns not written yet, so the count of 1s gives the
            # position and the mask itself says what may be attended to. No shape here depends
            # on the step, so over a static cache one compilation serves every step.
            if seq_len != 1 or attention_mask is None:
                raise ValueError("a tensor start (a column per row) takes one token and an attention_mask")
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

    @classmethod
    def from_config(cls, config: ModelConfig | str, dtype=torch.float32, device="cpu", seed: int = 0):
        """A randomly initialised model; `config` may name one of CONFIGS."""
        if isinstance(config, str):
            if config not in CONFIGS:
                raise ValueError(f"unknown model config {config!r}; known: {sorted(CONFIGS)}")
            config = CONFIGS[config]
        model = cls(config).init_weights(seed)
        return model.to(device=device, dtype=dtype)


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


# ----------------------------------------------------------------------------------------------
# The models built on it: the reward model (train_rm.py) and the policy with its value head (train_ppo.py)


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
        tokens = nn.utils.rnn.pad_sequence([torch.tensor(s) for s in seqs], batch_first=True, padding_value=pad_id)
        mask = nn.utils.rnn.pad_sequence([torch.ones(len(s), dtype=torch.long) for s in seqs], batch_first=True)
        return self(tokens.to(device), mask.to(device))


class PolicyWithValue(nn.Module):
    """PPO's policy (a LLaMA) and a value head on its final hidden state, as one module so that
    FSDP wraps both. The embedding and the blocks below `first_trainable` are frozen (paper App.
    E: only the last two are updated in RL, train_ppo.TRAINABLE_BLOCKS). PPO runs it in two slices:

        bottom   the frozen embedding and blocks [0, first_trainable): the residual stream that
                 enters block first_trainable, computed once per experience
        top      blocks [first_trainable, L), the norm, the head and the value head on that
                 stream: (logits, values) per position (of `positions` only, when given)

    Both are calls of forward, which is the policy's Transformer.forward with the value head
    added on request: under FSDP the root's weights (the embedding, the final norm and both
    heads) are gathered in nn.Module.__call__, so every slice goes through it."""

    def __init__(self, policy: Transformer, trainable_blocks: int):
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


# ----------------------------------------------------------------------------------------------
# Named configurations


# `tiny` is the embedded default: a few million parameters that train on a
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


if __name__ == "__main__":  # print the named configs' sizes
    for name, cfg in CONFIGS.items():
        print(f"{name:10s} {cfg.num_params() / 1e6:10.1f}M parameters")
