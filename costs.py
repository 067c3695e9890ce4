"""The arithmetic behind plan.py's dry runs: the memory model (bytes a rank holds, by the
categories simulate.py measures) and the time model (FLOPs at a stated share of the
accelerator's peak, FSDP's collectives at stated bandwidths, the slower of the two).
"""

from __future__ import annotations

from dataclasses import dataclass


GIB = 2**30

# Defaults for the time estimates: the A100 the paper trained on (App. E: 8 A100s).
PEAK_TFLOPS = 312.0  # A100 dense bf16 tensor-core peak, NVIDIA A100 datasheet
HBM_TBPS = 2.039  # A100 80GB SXM memory bandwidth, TB/s, the same datasheet
# The share of that peak a training step reaches. LLaMA's paper (Touvron et al. 2023, §2.4)
# reports ~380 tokens/s/GPU for the 65.2B model on 2,048 A100-80GB: 6 x 65.2e9 x 380 / 312e12 =
# 0.48 with a hand-tuned stack; FSDP on one node of 8 reaches less, so we plan with 0.40.
MFU = 0.40
MBU = 0.60  # the share of HBM bandwidth a decoding step reaches (weights and KV cache read once a step)


# -- the memory model ----------------------------------------------------------------------------------------


def block_activation_bytes(config, act_bytes: int) -> int:
    """Bytes one token leaves saved for backward in one block, as model.py's Block saves them
    (counted with saved_tensors_hooks): each RMSNorm its fp32 input (4 bytes a value, as it
    normalises in fp32) and its output; the normed inputs of the projections; q and k after
    RoPE, v, and attention's output (SDPA's flash kernel keeps those and a per-head scalar);
    gate, up, silu(gate) and their product. In the compute dtype but the norms' fp32 inputs:
    24 x hidden + 8 x intermediate bytes in bf16 for multi-head attention."""
    h, f = config.hidden_size, config.intermediate_size
    q = config.num_attention_heads * config.head_dim
    kv = config.num_key_value_heads * config.head_dim
    return 2 * 4 * h + act_bytes * (4 * h + 2 * q + 2 * kv + 4 * f)


def gradient_bytes(n_params: int, *, world: int, grad_sync: str) -> float:
    """Gradient bytes a rank holds between micro-batches (see train_sft.train_step): its fp32
    shard when gradients are reduce-scattered every micro-batch, the whole unsharded fp32
    gradient when they are kept until the last one."""
    return 4 * n_params / world if grad_sync == "every" else 4 * n_params


def training_memory(
    config,
    *,
    world: int,
    micro_batch: int,
    seq_len: int,
    bf16: bool,
    activation_checkpointing: bool,
    grad_sync: str = "every",
    logits: bool = True,
    shard: int | None = None,
) -> dict:
    """Per-rank training memory in GiB under FSDP2 (ZeRO-3-like) with AdamW, by arithmetic.

    states     fp32 master weights and two fp32 Adam moments: 12 bytes a parameter, divided
               among the ranks (those of a shard group under HSDP, `shard`)
    grads      gradient_bytes: 4 bytes a parameter / ranks (grad_sync "every"), or 4 bytes a
               parameter on every rank (grad_sync "last", held across micro-batches)
    in_flight  what is gathered at once: the root's weights (embedding, head) and about two
               blocks (the running one and the prefetched one) in the compute dtype, plus one
               block's unsharded gradients in fp32
    activations  saved for backward: block_activation_bytes per token and block; with
               checkpointing only each block's input is kept, plus one block's worth while it
               is recomputed. The logits add 8 bytes per vocabulary entry and token (their fp32
               copy and log-softmax, or its gradient, at the peak); a reward model (logits
               False) reads a score head instead.
    Checked against the simulation (simulate_training) at Ziya-13B on 8 ranks: within 1-2% of
    it without checkpointing, +0 to +7% with it (micro-batches 1 to 16); tests hold it within
    10% at Ziya's widths.
    """
    h, v, L = config.hidden_size, config.vocab_size, config.num_hidden_layers
    act_bytes = 2 if bf16 else 4
    n = config.num_params()
    block = (n - v * h * (1 if config.tie_word_embeddings else 2) - h) // L
    root = n - L * block
    tokens = micro_batch * seq_len
    per_layer = tokens * block_activation_bytes(config, act_bytes)
    acts = (L * tokens * h * act_bytes + per_layer) if activation_checkpointing else L * per_layer
    acts += tokens * v * 8 if logits else 0
    states = 12 * n / (shard or world)
    grads = gradient_bytes(n, world=shard or world, grad_sync=grad_sync)
    in_flight = (root + 2 * block) * act_bytes + 4 * block
    return {
        "states": states / GIB,
        "grads": grads / GIB,
        "in_flight": in_flight / GIB,
        "activations": acts / GIB,
        "total": (states + grads + in_flight + acts) / GIB,
    }


def ppo_memory(
    config,
    *,
    world: int,
    chunk: int,
    prompt_len: int,
    new_tokens: int,
    micro_batch: int,
    trainable_blocks: int,
    gathered_rollout: bool = True,
    reward_sharded: bool = True,
    frozen_bf16: bool = False,
    shard: int | None = None,
) -> dict:
    """Per-rank GiB of PPO's layout on GPUs (bf16 compute, fp32 shards), by arithmetic; "ranks"
    are those a model is sharded over (`shard` under HSDP, else `world`):

    frozen     the embedding and the frozen blocks, FSDP-sharded fp32: 4 bytes a parameter / ranks
               (no gradient, no optimizer state); 2 with frozen_bf16 (--frozen-bf16)
    trainable  the top blocks, norm, head and value head, sharded: fp32 weight, gradient and
               two Adam moments, 16 bytes a parameter / ranks
    reference  π0's top, replicated in bf16 (2 bytes a parameter)
    reward     the reward model in bf16, frozen: its shard (--reward-placement sharded, the
               default), or the whole of it on every rank (replicated)
    in_flight  what FSDP holds gathered: the whole policy in bf16 while the rollout keeps it
               gathered (the default), else the root (embedding, head) and two blocks
    kv_cache   one chunk's keys and values, bf16, all layers, prompt + new tokens
    activations  a micro-batch through the top blocks only (the bottom runs without gradient,
               block_activation_bytes), plus the logits (fp32 copy and log-softmax)
    """
    h, v, L = config.hidden_size, config.vocab_size, config.num_hidden_layers
    n = config.num_params()
    head = v * h * (1 if config.tie_word_embeddings else 2)
    block = (n - head - h) // L
    top = trainable_blocks * block + h + (0 if config.tie_word_embeddings else v * h) + h
    frozen = n - top + h
    seq = prompt_len + new_tokens
    ranks = shard or world
    parts = {
        "frozen": (2 if frozen_bf16 else 4) * frozen / ranks,
        "trainable": 16 * top / ranks,
        "reference": 2 * (trainable_blocks * block + h + v * h),
        "reward": 2 * (n - v * h + h) / (ranks if reward_sharded else 1),  # without its LM head (RewardModel.scorer)
        "in_flight": 2 * (n + h) if gathered_rollout else 2 * (head + 2 * block),
        "kv_cache": 2 * 2 * L * chunk * seq * config.num_key_value_heads * config.head_dim,
        "activations": micro_batch * seq * (trainable_blocks * block_activation_bytes(config, 2) + v * 8),
    }
    parts = {k: b / GIB for k, b in parts.items()}
    parts["total"] = sum(parts.values())
    return parts


# -- time ------------------------------------------------------------------------------------------------------


def matmul_params(config, blocks: int | None = None, head: bool = True) -> int:
    """Weights that multiply an activation in a forward pass through `blocks` blocks (all by
    default) and, if `head`, the LM head: every weight but the embedding table (a lookup) and the
    norms' gains (elementwise)."""
    h, f, hd = config.hidden_size, config.intermediate_size, config.head_dim
    block = h * hd * (2 * config.num_attention_heads + 2 * config.num_key_value_heads) + 3 * h * f
    blocks = config.num_hidden_layers if blocks is None else blocks
    return blocks * block + (config.vocab_size * h if head else 0)


def forward_flops(config, tokens: int, context: float, blocks: int | None = None, head: bool = True) -> float:
    """FLOPs of a forward pass of `tokens` tokens that attend to `context` keys each on
    average: 2 per multiplying weight and token, and attention's two products (q·k and the
    weighted sum of v) at 2·hidden·context each per token and block. A causal sequence of T
    tokens has context (T + 1) / 2: what a causal kernel computes (PaLM's convention counts T,
    Chowdhery et al. 2022, App. B)."""
    blocks = config.num_hidden_layers if blocks is None else blocks
    attention = 4 * config.num_attention_heads * config.head_dim * context * blocks
    return tokens * (2 * matmul_params(config, blocks, head) + attention)


def train_flops(config, tokens: int, seq_len: int, activation_checkpointing: bool = False, head: bool = True) -> float:
    """FLOPs of training on `tokens` tokens in sequences of seq_len: the forward, and a
    backward of twice its cost (a gradient for the input and one for the weight of every
    product), 6 per weight and token in all; activation checkpointing runs the blocks' forward
    a second time. head False: a reward model, whose score head replaces the LM head."""
    fwd = forward_flops(config, tokens, (seq_len + 1) / 2, head=head)
    recompute = forward_flops(config, tokens, (seq_len + 1) / 2, head=False) if activation_checkpointing else 0.0
    return 3 * fwd + recompute


def decode_step(
    config,
    batch: int,
    context: int,
    *,
    weight_bytes: float,
    peak_tflops: float = PEAK_TFLOPS,
    mfu: float = MFU,
    hbm_tbps: float = HBM_TBPS,
    mbu: float = MBU,
) -> dict:
    """One decoding step of `batch` sequences at `context` cached positions: its FLOPs (2 per
    weight and sequence, and attention over the cache), the bytes it must read (every weight
    once, `weight_bytes`, and the KV cache of every sequence, bf16), and its time: the larger of
    compute at mfu x peak and reading at mbu x bandwidth. At a batch of 8 a 13B step reads
    26 GB to do 0.2 TFLOP: memory-bound by two orders of magnitude."""
    flops = forward_flops(config, batch, context)
    kv = 2 * 2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim * context * batch
    compute_s = flops / (peak_tflops * 1e12 * mfu)
    memory_s = (weight_bytes + kv) / (hbm_tbps * 1e12 * mbu)
    return {
        "flops": flops,
        "bytes": weight_bytes + kv,
        "seconds": max(compute_s, memory_s),
        "memory_bound": memory_s > compute_s,
    }


# What the time model assumes FSDP's collectives reach: NCCL's bus bandwidth for a ring
# all-gather or reduce-scatter, GB/s a GPU (--intra-node-gbps, --inter-node-gbps). Assumed, not
# measured here: no GPU has run this code.
GPUS_PER_NODE = 8
INTRA_NODE_GBPS = 230.0  # inside an 8-GPU A100 node: NVLink 3 through NVSwitch, 300 GB/s a direction, ~3/4 reached
INTER_NODE_GBPS = 23.0  # across nodes: one 200 Gb/s HDR InfiniBand NIC a GPU (DGX A100's 8), ~90% of its 25 GB/s


@dataclass
class Network:
    """The links between `world` GPUs, GPUS_PER_NODE a node, and the group a model is sharded
    over: `shard` consecutive ranks (HSDP, distributed.device_mesh), or all of them (None)."""

    world: int
    shard: int | None = None
    intra_gbps: float = INTRA_NODE_GBPS
    inter_gbps: float = INTER_NODE_GBPS

    def _ring(self, nbytes: float, ranks: int, across_nodes: bool) -> float:
        # A ring all-gather or reduce-scatter: each rank sends and receives (ranks - 1) / ranks of
        # the whole tensor, at the bandwidth of the slowest link the ring crosses.
        gbps = self.inter_gbps if across_nodes else self.intra_gbps
        return nbytes * (ranks - 1) / ranks / (gbps * 1e9) if ranks > 1 else 0.0

    def gather(self, nbytes: float) -> float:
        """Seconds of an all-gather (or reduce-scatter) of `nbytes`, whole, over the shard group."""
        ranks = self.shard or self.world
        return self._ring(nbytes, ranks, ranks > GPUS_PER_NODE)

    def reduce(self, nbytes: float) -> float:
        """Seconds of a gradient reduction of `nbytes`, whole: a reduce-scatter over the shard
        group, and under HSDP an all-reduce (twice a ring) of each shard across the copies, whose
        members sit on different nodes once there is more than one node."""
        ranks = self.shard or self.world
        copies = self.world // ranks
        return self.gather(nbytes) + 2 * self._ring(nbytes / ranks, copies, self.world > GPUS_PER_NODE)


def training_step_seconds(
    config,
    *,
    world: int,
    batch: int,
    micro_batch: int,
    seq_len: int,
    bf16: bool = True,
    activation_checkpointing: bool = False,
    grad_sync: str = "every",
    head: bool = True,
    net: Network | None = None,
    peak_tflops: float = PEAK_TFLOPS,
    mfu: float = MFU,
) -> dict:
    """Seconds of one optimizer step of `batch` sequences of seq_len (head False: a reward
    model's, whose items are pairs: pass 2 x pairs): the compute (train_flops at mfu of the peak,
    the ranks splitting it), FSDP's collectives, and the step: the slower of the two, FSDP2
    overlapping them (it gathers the next block while one computes, and reduces the last one's
    gradients while the next runs backward). Each of a rank's micro-batches gathers every block
    twice in the compute dtype (forward; backward, which recomputes under checkpointing from the
    same gather); gradients are reduced in fp32 after each micro-batch (grad_sync "every") or
    after the last."""
    net = net or Network(world)
    n = config.num_params() - (0 if head or config.tie_word_embeddings else config.vocab_size * config.hidden_size)
    micros = batch // (world * micro_batch)
    compute = train_flops(config, batch * seq_len, seq_len, activation_checkpointing, head=head) / (
        world * peak_tflops * 1e12 * mfu
    )
    comm = micros * 2 * net.gather((2 if bf16 else 4) * n) + (micros if grad_sync == "every" else 1) * net.reduce(4 * n)
    return {"compute": compute, "collectives": comm, "seconds": max(compute, comm)}


def ppo_round_seconds(
    config,
    *,
    world: int,
    rollout_size: int,
    chunk_size: int,
    score_batch_size: int,
    batch_size: int,
    ppo_epochs: int,
    prompt_len: int,
    new_tokens: int,
    trainable_blocks: int,
    micro_batch: int = 1,
    gathered_rollout: bool = True,
    reward_sharded: bool = True,
    net: Network | None = None,
    peak_tflops: float = PEAK_TFLOPS,
    mfu: float = MFU,
    hbm_tbps: float = HBM_TBPS,
    mbu: float = MBU,
) -> dict:
    """Seconds of each part of a PPO round on `world` GPUs, every rank doing its share at once
    (--rollout-size / world prompts), prompts of prompt_len tokens and responses of new_tokens,
    each part the slower of its compute and its collectives (see training_step_seconds; all
    bf16 gathers, fp32 reductions, over `net`):

        rollout     the queue of train_ppo.generate_round, --chunk-size rows: every response
                    new_tokens long, the rows fill and empty together, a wave at a time; per
                    prompt a prefill of its own (compute-bound, it gives the first token), per
                    wave new_tokens - 1 decoding steps of its rows that read the bf16 policy
                    and the KV cache (decode_step: memory-bound); the policy gathered once a
                    round (distributed.gathered), or at every forward (gathered_rollout False,
                    --reshard-in-rollout)
        scoring     the reward model's forward over prompt + response; sharded, it is gathered
                    once a batch of --score-batch-size
        experience  the frozen bottom once (kept for the round), the trainable top and π0's top;
                    the policy gathered once a micro-batch
        update      ppo_epochs passes of the top alone on the kept bottom: its forward and a
                    backward twice as costly; the top gathered twice a micro-batch and its
                    gradient reduced once
    """
    net = net or Network(world)
    per_rank = rollout_size // world
    seq = prompt_len + new_tokens
    tokens = per_rank * seq
    rate = peak_tflops * 1e12 * mfu
    weight_bytes = 2 * matmul_params(config)
    n = config.num_params()
    head = config.vocab_size * config.hidden_size
    top_params = (
        (n - head * (1 if config.tie_word_embeddings else 2)) // config.num_hidden_layers * trainable_blocks
        + head
        + config.hidden_size
    )
    gather_policy = net.gather(2 * n)
    prefill = forward_flops(config, prompt_len, (prompt_len + 1) / 2) / rate
    rollout = gather_policy if gathered_rollout else 0.0
    prefills = steps = 0
    for c in range(0, per_rank, chunk_size):  # a wave of rows
        batch = min(chunk_size, per_rank - c)
        prefills += batch
        rollout += batch * (prefill if gathered_rollout else max(prefill, gather_policy))
        for k in range(1, new_tokens):  # the step that feeds token k attends to prompt_len + k positions
            steps += 1
            step = decode_step(
                config,
                batch,
                prompt_len + k,
                weight_bytes=weight_bytes,
                peak_tflops=peak_tflops,
                mfu=mfu,
                hbm_tbps=hbm_tbps,
                mbu=mbu,
            )["seconds"]
            rollout += step if gathered_rollout else max(step, gather_policy)
    chunks = -(-per_rank // score_batch_size)  # the scoring batches
    causal = (seq + 1) / 2
    top = forward_flops(config, tokens, causal, blocks=trainable_blocks)
    bottom = forward_flops(config, tokens, causal, blocks=config.num_hidden_layers - trainable_blocks, head=False)
    micros = -(-per_rank // micro_batch)
    updates_micros = ppo_epochs * (rollout_size // batch_size) * -(-batch_size // (world * micro_batch))
    parts = {
        "rollout": rollout,
        "scoring": max(
            forward_flops(config, tokens, causal, head=False) / rate,
            chunks * net.gather(2 * (n - head)) if reward_sharded else 0.0,
        ),
        "experience": max((bottom + 2 * top) / rate, micros * gather_policy),
        "update": max(
            ppo_epochs * 3 * top / rate, updates_micros * (2 * net.gather(2 * top_params) + net.reduce(4 * top_params))
        ),
    }
    parts["total"] = sum(parts.values())
    parts["steps"] = ppo_epochs * rollout_size // batch_size
    parts["prefills"], parts["decoding_steps"] = prefills, steps  # the rollout's forwards on a rank
    return parts


def size(nbytes: float) -> str:
    return f"{nbytes / GIB:.1f} GiB" if nbytes >= GIB else f"{nbytes / 2**20:.1f} MiB"


def hours(seconds: float) -> str:
    return f"{seconds / 3600:,.1f} h" if seconds >= 360 else f"{seconds:,.0f} s"
