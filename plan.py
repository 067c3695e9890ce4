"""Will it fit, and how long will it take? The paper's runs planned on a CPU, with no GPU.

    python train_sft.py --model ziya-13b --dry-run --world-size 8             # the memory model, instantly
    python train_sft.py --model ziya-13b --dry-run --simulate --world-size 8  # measured: this code's steps
    python train_rm.py  --model ziya-13b --dry-run [--simulate]
    python train_ppo.py --policy ziya-13b --dry-run [--simulate]

Measured means the trainer's own step at full size: the trainer's train_step (its loss
and AdamW for SFT and the reward model; for PPO a round as train_ppo.py runs it (the rollout with
the policy kept gathered, the reward model's scoring, the experience pass, an update step).
They run on fake tensors (torch's FakeTensorMode: every tensor has its shape, dtype and device
but no storage) over `world` ranks that exist only in this process (torch's fake process group:
collectives that move nothing), the model sharded by training.shard as a run shards it, while
torch's FSDPMemTracker follows every tensor rank 0 holds and keeps the peak by category. A 13B
step takes seconds of one CPU core and no memory to speak of.

What the measurement leaves out: what is not a tensor (the CUDA context, ~0.5-1 GiB; NCCL's
buffers; cuBLAS's workspace), the caching allocator's fragmentation, and the kernels' own
scratch space on a GPU (attention here is the CPU's flash kernel, which like the GPU's keeps
O(sequence) per head, not the T x T scores). Plan 10-15% of headroom for them.

What the simulation needs of the code it runs, said here once: the trainers hand it their own
functions (train_step; PPO's parts, train_ppo.plan_parts), so that plan.py imports no trainer.
Those functions read no value back from the device (a fake tensor has none): a step's loss,
a round's sums and a decoding step with eos_id None stay tensors until their caller reads them.
Weights are allocated with load_state_dict(assign=True) (model.allocate), which works on fake
tensors where .to() cannot swap them, and every part of PPO's policy (PolicyWithValue's
bottom and top) runs through nn.Module.__call__, where FSDPMemTracker sees it (a method
registered with FSDP2's register_fsdp_forward_method is not seen).

The memory model (the instant table) is arithmetic over the same categories; tests hold it
within 10% of the measurement (docs/scale.md has both at 13B). Time is arithmetic on purpose:
FLOPs of each step from the config, at a stated share of the accelerator's peak, and FSDP's
collectives at stated bandwidths, the slower of the two (training_step_seconds,
ppo_round_seconds). With --gpu-memory-gb the dry run chooses the fastest layout that fits
(choose: the time model ranks, the memory model prunes, the simulation decides).
"""

from __future__ import annotations

import contextlib
import functools
import math
import shlex
from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist

from safety import COUNT, POSITIVE, SHARE

GIB = 2**30

# Defaults for the time estimates: the A100 the paper trained on (App. E: 8 A100s).
PEAK_TFLOPS = 312.0  # A100 dense bf16 tensor-core peak, NVIDIA A100 datasheet
HBM_TBPS = 2.039  # A100 80GB SXM memory bandwidth, TB/s, the same datasheet
# The share of that peak a training step reaches. LLaMA's paper (Touvron et al. 2023, §2.4)
# reports ~380 tokens/s/GPU for the 65.2B model on 2,048 A100-80GB: 6 x 65.2e9 x 380 / 312e12 =
# 0.48 with a hand-tuned stack; FSDP on one node of 8 reaches less, so we plan with 0.40.
MFU = 0.40
MBU = 0.60  # the share of HBM bandwidth a decoding step reaches (weights and KV cache read once a step)


# -- fake ranks, fake tensors, a tracker ----------------------------------------------------------------


@contextlib.contextmanager
def fake_ranks(world: int, shard: int | None = None):
    """`world` ranks inside this process, this one rank 0, and tensors without storage: yields
    (training.Distributed, the device mesh for training.shard). shard (--shard-ranks): the
    model sharded over groups of that many ranks and replicated across them (HSDP, a 2-D
    mesh, training.device_mesh); None or `world`: over all of them. The mesh is built before
    fake mode is entered (a mesh reads its ranks' numbers back from a tensor)."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from training import Distributed, device_mesh

    if dist.is_initialized():
        raise RuntimeError("a dry run makes its own (fake) process group; run it outside torchrun")
    dist.init_process_group("fake", rank=0, world_size=world, store=FakeStore())
    try:
        mesh = device_mesh("cpu", world, shard)
        with FakeTensorMode():
            yield Distributed(0, world, 0, torch.device("cpu")), mesh
    finally:
        dist.destroy_process_group()


# FSDPMemTracker's categories -> ours; "Buffer" holds the weights of modules outside the FSDP
# root (PPO's replicated reward model and π0's top, see tracking).
CATEGORIES = {
    "Sharded Param": "weights",
    "Unsharded Param": "gathered",
    "Sharded Grad": "grads",
    "Unsharded Grad": "gathered grads",
    "OptState": "optimizer",
    "Buffer": "replicated",
    "Activation": "activations",
    "Temp": "temporaries",
    "All Gather": "all-gather",
    "Reduce Scatter": "reduce-scatter",
    "Inputs": "inputs",
}


@dataclass
class Measurement:
    """The peak a tracker saw, bytes by category (CATEGORIES' values) and in all."""

    parts: dict[str, int]

    @property
    def total(self) -> int:
        return sum(self.parts.values())


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's part of a tensor: a DTensor's local shard, or the tensor itself."""
    return t.to_local() if hasattr(t, "to_local") else t


@functools.cache
def _peak_tracker():
    """FSDPMemTracker keeping the peak by category alone, all plan.py reads of it. Its own
    update after every operation also walks every module it has seen, for per-module peaks
    nothing here reads: O(modules) an operation, most of the time of a 13B simulation (whose
    40 blocks are several hundred modules). The peak by category is the same, to the byte."""
    from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker

    class PeakTracker(FSDPMemTracker):
        def _update_peak_stats(self, peak_state):
            for device, snapshot in self._curr_mem_snap.items():
                if self._peak_mem.get(device, 0) < snapshot["Total"]:
                    self._peak_mem[device] = snapshot["Total"]
                    self._peak_mem_snap[device] = dict(snapshot)

    return PeakTracker


@contextlib.contextmanager
def tracking(root, optimizer=None, replicated=(), inputs=()):
    """Track what this rank holds while the block runs: FSDPMemTracker over the FSDP module
    `root` (its shards, what it gathers, gradients, `optimizer`'s state, every tensor made
    inside), plus the weights of `replicated` modules outside it and the tensors `inputs` made
    before it (PPO's kept bottom output). Yields a Measurement, filled when the block ends.

    FSDPMemTracker refuses a root module called more than once (it takes that for a second
    iteration): a rollout calls it at every decoding step and PPO's experience pass twice (the
    bottom, then the top). The root's own module-wise statistics are dropped before each call
    of it, and every FSDP unit that has none yet gets an empty one: FSDP's final backward
    callback reads them, a PPO update's too, whose frozen bottom never runs (its output is
    kept). The peak by category, all this reports, is kept across calls."""
    from torch.distributed._tools.fsdp2_mem_tracker import _FSDPModMemStats, _FSDPRefType
    from torch.distributed.fsdp import FSDPModule

    tracker = _peak_tracker()(root, optimizer)
    # The replicated weights must be known to the tracker before they are used: a view of one
    # (the transposed weight of a linear layer) would otherwise be counted as an activation.
    # They go in as "Buffer", a category of FSDPMemTracker's own that our models never fill (no
    # module registers a buffer), through the call MemTracker.track_external makes for its own.
    assert not any(True for _ in root.buffers()), "a buffer in the model would be counted as replicated"
    for module in replicated:  # a module sharded apart from `root` (PPO's reward model) by its shards
        for t in module.state_dict().values():
            tracker._update_and_maybe_create_winfos(local(t), _FSDPRefType.BUFFER)
    for t in inputs:
        tracker._update_and_maybe_create_winfos(t, _FSDPRefType.INP)
    result = Measurement({})
    units = [(name, m) for name, m in root.named_modules() if isinstance(m, FSDPModule) and m is not root]
    with tracker:

        def forget_root(*_):
            tracker.memory_tracking.pop(root, None)
            for name, unit in units:
                if unit not in tracker.memory_tracking:
                    tracker.memory_tracking[unit] = _FSDPModMemStats(name)

        hook = root.register_forward_pre_hook(forget_root, prepend=True)
        try:
            yield result
        finally:
            hook.remove()
    for device, snapshot in tracker.get_tracker_snapshot("peak").items():
        for kind, nbytes in snapshot.items():
            name = CATEGORIES.get(getattr(kind, "value", kind))
            if name and nbytes:
                result.parts[name] = result.parts.get(name, 0) + nbytes


# -- SFT and the reward model: optimizer steps ---------------------------------------------------------------


def simulate_training(make_model, train_step, *, world: int, shard: int | None = None, **kwargs) -> Measurement:
    """measure_training on rank 0 of `world` fake ranks (sharded over `shard`, see fake_ranks)."""
    with fake_ranks(world, shard) as (d, mesh):
        return measure_training(d, mesh, make_model, train_step, **kwargs)


def measure_training(
    d,
    mesh,
    make_model,
    train_step,
    *,
    micro_batch: int,
    units_per_step: int = 2,
    bf16: bool = True,
    grad_sync: str = "every",
    lr: float = 1e-5,
    weight_decay: float = 0.1,
    grad_clip: float = 1.0,
) -> Measurement:
    """The peak of a training step on this rank (`d`): the model make_model() builds (with
    .layers) sharded as the trainers shard it, then optimizer steps of a global batch that
    gives every rank `units_per_step` micro-batches of `micro_batch` items (the second
    micro-batch finds the first's gradients held, all that a longer accumulation holds).
    train_step(model, d, n, micro_batch=, grad_clip=, grad_sync=) is the trainer's own
    (train_sft.train_step, train_rm.train_step) on a global batch of n items. The first step runs untracked: it makes Adam's state, as
    every step of a run but the first finds it, and it warms the caches of DTensor's sharding
    rules, whose first use the tracker would otherwise count (tracked, it came out 8% high on
    the tiny model in a fresh process, and the same as every later run after it). The second
    step is tracked. Real ranks and tensors work the same (tests compare the two)."""
    from training import make_optimizer, shard

    with torch.device("meta"):
        model = make_model()
    shard(model, model.layers, bf16=bf16, mesh=mesh)
    model.to_empty(device=d.device)
    fill_(model)
    model.train()
    opt = make_optimizer(model, lr, weight_decay)
    batch = list(range(d.world * micro_batch * units_per_step))

    def step(items):
        train_step(model, d, len(items), micro_batch=micro_batch, grad_clip=grad_clip, grad_sync=grad_sync)
        opt.step()
        opt.zero_grad(set_to_none=True)

    step(batch[: d.world * micro_batch])  # one micro-batch does all the first step is for
    with tracking(model, opt) as peak:
        step(batch)
    return peak


@torch.no_grad()
def fill_(*modules):
    """Weights small enough that nothing overflows (what they are does not change what is held;
    on real tensors, uninitialised memory could hold NaNs that sampling refuses)."""
    for module in modules:
        for p in module.parameters():
            local(p).normal_(0, 0.02)


# -- PPO: a round -----------------------------------------------------------------------------------------

# Tokens of each response the simulated rollout samples. The rollout's queue (generate.CacheRows)
# allocates its whole KV cache (every row, the longest prompt + every new token) when its first
# prompt joins, and a step allocates nothing that outlives it; the rows admitted later have the
# same shapes as the first. So one wave of rows (a prefill each, its first token, then one
# decoding step, after which every response ends) holds the peak of a whole round's queue
# (tests/test_plan.py checks it against every token of every prompt, on real tensors).
ROLLOUT_STEPS = 2


@dataclass
class StandInTokenizer:
    """What PPO's functions read of a tokenizer (its special ids and its size), for a simulation
    or a benchmark that has none."""

    vocab: int
    pad_id: int = 0
    eos_id: int = 2
    bos_id: int = 1
    add_bos: bool = True

    @property
    def bos(self) -> list[int]:
        return [self.bos_id]

    def __len__(self) -> int:
        return self.vocab


@dataclass
class PPOParts:
    """What a simulated PPO round runs: train_ppo.py's own functions and constants, which
    train_ppo.py hands over (train_ppo.plan_parts). plan.py imports no trainer: each gives it
    what it measures, so the arrow points one way, from the trainers to the planner."""

    build_empty: Callable  # (config, d, *, trainable_blocks, bf16, frozen_bf16, mesh) -> (model, ref)
    reward_empty: Callable  # (config, d, dtype, *, sharded, mesh) -> the reward model
    experience: type  # Experience(prompt, response, finished)
    minibatches: Callable
    make_experience: Callable
    update_step: Callable
    generate_round: Callable  # the rollout's sampling (generate.generate_queue), as train_ppo.rollout runs it
    settings: dict  # the loss's settings (clip_ratio, clip_value, vf_coef, grad_clip) and init_kl_coef


def simulate_ppo(config, parts: PPOParts, *, world: int, shard: int | None = None, **kwargs) -> dict:
    """measure_ppo on rank 0 of `world` fake ranks (sharded over `shard`, see fake_ranks)."""
    with fake_ranks(world, shard) as (d, mesh):
        return measure_ppo(d, mesh, config, parts, **kwargs)


def measure_ppo(
    d,
    mesh,
    config,
    parts: PPOParts,
    *,
    trainable_blocks: int,
    rollout_size: int,
    chunk_size: int,
    batch_size: int,
    micro_batches: list[int],
    prompt_len: int,
    new_tokens: int,
    gathered_rollout: bool = True,
    reward_sharded: bool = True,
    frozen_bf16: bool = False,
    bf16: bool = True,
    rollout_steps: int | None = ROLLOUT_STEPS,
) -> dict:
    """The peak of each part of a PPO round on this rank (`d`), placed as train_ppo.py places it:
    the policy + value head sharded (train_ppo.build_empty), π0's top replicated and the reward
    model sharded (or replicated: reward_sharded False) in the compute dtype
    (train_ppo.reward_empty), AdamW over the trainable top. What is held outside the part's
    FSDP module, π0's top and the reward model's shards or whole copy, shows as "replicated";
    while the sharded reward model scores it is the tracked module, and the policy's shards
    and Adam's state are what it holds beside. Every prompt has
    `prompt_len` tokens and every response `new_tokens` (fake tensors hold no eos to stop on).
    Each part is tracked on its own:

        "rollout"     train_ppo.generate_round (the policy gathered unless gathered_rollout is
                      False; generate.generate_queue, its KV cache of --chunk-size rows) on one
                      wave of rows, each response `rollout_steps` tokens long (ROLLOUT_STEPS);
                      None: this rank's whole share, every response new_tokens long
        "scoring"     the reward model on a chunk of --chunk-size (RewardModel.score_ids)
        ("experience", m)  train_ppo.make_experience: the kept bottom output, the forwards in
                      micro-batches of m, GAE and whitening, over this rank's share of the round
        ("update", m)      train_ppo.update_step on the first minibatch, micro-batches of m,
                      with the experience pass's kept bottom output and per-token tensors held

    For each micro-batch size the experience pass and an update run once untracked first, so
    that Adam's state exists, as from the second round on, and DTensor's caches are warm (see
    measure_training). Left out, being bookkeeping: sampling's Python side and the object
    collective that shares the sampled token ids between ranks."""
    from types import SimpleNamespace

    from training import make_optimizer

    compute = torch.bfloat16 if bf16 else torch.float32
    loss = {k: v for k, v in parts.settings.items() if k != "init_kl_coef"}
    args = SimpleNamespace(
        batch_size=batch_size,
        micro_batch_size=micro_batches[0],
        seed=0,
        chunk_size=chunk_size,
        grad_sync="every",
        **loss,
    )
    tok = StandInTokenizer(config.vocab_size)
    prompt, response = [1] + [3] * (prompt_len - 1), [3] * new_tokens
    out = {}
    model, ref = parts.build_empty(
        config, d, trainable_blocks=trainable_blocks, bf16=bf16, frozen_bf16=frozen_bf16, mesh=mesh
    )
    rm = parts.reward_empty(config, d, compute, sharded=reward_sharded, mesh=mesh)  # as train_ppo loads it
    fill_(model, ref, rm)
    opt = make_optimizer(model, 1e-6, 0.0)
    exps = [parts.experience(prompt, response, True) for _ in range(rollout_size)]
    batches = parts.minibatches(len(exps), batch_size, 0, 0)
    replicated = (rm, ref)

    def experience():
        for e in exps:
            e.bottom_out = None  # each pass keeps its own, as each round does
        parts.make_experience(model, ref, exps, batches, tok, args, d, parts.settings["init_kl_coef"])

    def update():
        parts.update_step(model, opt, exps, batches[0], tok, args, d, {})

    def kept():
        return [
            t
            for e in exps
            for t in (e.bottom_out, e.logp, e.ref_logp, e.values, e.advantages, e.returns)
            if t is not None
        ]

    for micro in micro_batches:
        args.micro_batch_size = micro
        experience()
        update()  # untracked: Adam's state, and DTensor's caches warm
        with tracking(model, opt, replicated) as out["experience", micro]:
            experience()
        with tracking(model, opt, replicated, inputs=kept()) as out["update", micro]:
            update()
    # The rollout: train_ppo's own sampling (its queue of --chunk-size rows), on one wave of rows
    # whose responses end after `rollout_steps` tokens (ROLLOUT_STEPS), or on this rank's whole
    # share, every response new_tokens long (rollout_steps None).
    share = rollout_size // d.world
    length = new_tokens if rollout_steps is None else min(rollout_steps, new_tokens)
    sampled: dict[int, int] = {}

    def readback(tokens, indices: list[int]) -> list[int]:  # fake tensors hold no token: say them
        for i in indices:
            sampled[i] = sampled.get(i, 0) + 1
        return [tok.eos_id if sampled[i] == length < new_tokens else 3 for i in indices]

    args.max_new_tokens, args.reshard_in_rollout = new_tokens, not gathered_rollout
    round_prompts = [prompt] * d.world * (share if rollout_steps is None else min(chunk_size, share))
    with tracking(model, opt, replicated) as out["rollout"]:
        parts.generate_round(model, round_prompts, tok, args, d, 0, readback=readback)
    chunk = [prompt] * min(chunk_size, share)
    if reward_sharded:
        adam = [local(t) for state in opt.state.values() for t in state.values() if torch.is_tensor(t) and t.dim()]
        scoring = tracking(rm, None, (model, ref), inputs=adam)
    else:
        scoring = tracking(model, opt, replicated)
    with scoring as out["scoring"], torch.no_grad():  # train_ppo.score_round's forward (its .tolist() aside)
        rm.score_ids(chunk, [response] * len(chunk), eos_id=tok.eos_id, pad_id=0)
        if reward_sharded:
            rm.reshard()
    return out


# -- sampling on one GPU ------------------------------------------------------------------------------------


def simulate_sampling(
    config, *, sequences: int, prompt_len: int, new_tokens: int, steps: int = 2, dtype=torch.bfloat16
) -> Measurement:
    """The peak of generate.decode_steps on one device, as `train_ppo.py sample` and
    `evaluate.py` run it (the whole model in `dtype`, no FSDP): `sequences` prompts of
    prompt_len tokens decoded for `steps` of new_tokens. Two steps show all a run of any length
    holds: the KV cache is allocated whole (prompt + new_tokens) at the prefill, and a step
    allocates nothing that outlives it. Tracked by torch's MemTracker (the model's weights
    under "replicated")."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.distributed._tools.mem_tracker import MemTracker

    from generate import decode_steps
    from model import Transformer, allocate

    with FakeTensorMode():
        with torch.device("meta"):
            model = Transformer(config)
        model = allocate(model, device="cpu", dtype=dtype).eval()
        fill_(model)
        # MemTracker hooks every parameter's gradient; these never get one (no_grad below).
        model.requires_grad_(True)
        tracker = MemTracker()
        tracker.track_external(model)

        def forget(module, _):  # each decoding step calls the model again, which MemTracker takes for
            if module is model:  # another iteration: its module statistics go first, its peak stays
                tracker.reset_mod_stats()

        hook = torch.nn.modules.module.register_module_forward_pre_hook(forget)  # before MemTracker's own
        try:
            with tracker, torch.no_grad():
                for i, _ in enumerate(
                    decode_steps(
                        model, [[1] * prompt_len] * sequences, max_new_tokens=new_tokens, eos_id=None, pad_id=0
                    )
                ):
                    if i + 1 == steps:
                        break
        finally:
            hook.remove()
    parts = {}
    for kind, nbytes in tracker.get_tracker_snapshot("peak")[torch.device("cpu")].items():
        name = {"Parameter": "weights", "Activation": "activations", "Temp": "temporaries"}.get(
            getattr(kind, "value", kind), None if kind == "Total" else "other"
        )
        if name and nbytes:
            parts[name] = parts.get(name, 0) + nbytes
    return Measurement(parts)


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
    over: `shard` consecutive ranks (HSDP, training.device_mesh), or all of them (None)."""

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
                    round (training.gathered), or at every forward (gathered_rollout False,
                    --reshard-in-rollout)
        scoring     the reward model's forward over prompt + response; sharded, it is gathered
                    once a chunk of --chunk-size
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
    chunks = -(-per_rank // chunk_size)  # the scoring batches
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


# -- choosing a layout -----------------------------------------------------------------------------------------

# What the dry run's choice leaves of a GPU's memory for what no simulation sees: the CUDA
# context, NCCL's buffers, cuBLAS's workspace, the caching allocator's fragmentation (the module
# docstring's 10-15%).
HEADROOM = 0.12
# The memory model is held within 10% of the simulation by tests: a layout it puts further than
# that above the usable memory cannot fit, and is not simulated.
MODEL_SLACK = 0.10


def usable_bytes(gpu_gb: float) -> float:
    """What a layout may hold on a GPU of gpu_gb GiB: all but HEADROOM."""
    return gpu_gb * (1 - HEADROOM) * GIB


@dataclass
class Candidate:
    """A layout the dry run may choose: the value of each flag it sets (False for a switch off,
    None for --shard-ranks over all ranks), the run's seconds by the time model, the memory
    model's bytes, and once simulated the peak a rank holds."""

    flags: dict
    seconds: float
    modelled: float
    simulated: float | None = None
    measured: dict | None = None  # the simulation's parts (PPO: simulate_ppo's), for the tables after

    DEFAULTS = {
        "--micro-batch-size": 1,
        "--activation-checkpointing": False,
        "--grad-sync": "every",
        "--shard-ranks": None,
        "--chunk-size": 8,
        "--reshard-in-rollout": False,
        "--reward-placement": "sharded",
        "--frozen-bf16": False,
    }  # the trainers' own defaults

    def changed(self) -> dict:
        return {k: v for k, v in self.flags.items() if v != self.DEFAULTS[k]}

    def command_flags(self) -> str:
        return " ".join(k if v is True else f"{k} {v}" for k, v in self.changed().items())


def choose(candidates: list[Candidate], usable: float, simulate, *, slack: float = MODEL_SLACK) -> list[Candidate]:
    """The candidates ranked by the time model (then by fewer flags), each marked: those the
    memory model puts above usable x (1 + slack) are pruned unsimulated; the rest are simulated
    in that order (simulate(candidate) -> bytes) until one fits `usable`. Returns the ranking up
    to and including the chosen one, the last (its .simulated <= usable), or the whole ranking
    when nothing fits."""
    ranked = sorted(candidates, key=lambda c: (round(c.seconds, 6), len(c.changed())))
    for i, c in enumerate(ranked):
        if c.modelled > usable * (1 + slack):
            continue
        c.simulated = simulate(c)
        if c.simulated <= usable:
            return ranked[: i + 1]
    return ranked


def torchrun(world: int, script: str) -> str:
    """How to start `script` on `world` GPUs, GPUS_PER_NODE a node."""
    if world == 1:
        return f"python {script}"
    if world <= GPUS_PER_NODE:
        return f"torchrun --nproc-per-node {world} {script}"
    return (
        f"torchrun --nnodes {world // GPUS_PER_NODE} --nproc-per-node {GPUS_PER_NODE} --rdzv-backend c10d "
        f"--rdzv-endpoint HOST:29500 {script}"
    )


def print_choice(ranked: list[Candidate], *, gpu_gb: float, world: int, command: str, log=print):
    """The dry run's answer, above its tables: the fastest layout that fits, and why each faster
    one did not."""
    usable = usable_bytes(gpu_gb)
    if not ranked:
        log(f"no layout: --batch-size is not a multiple of --micro-batch-size x {world} ranks for any micro-batch")
        return None
    chosen = ranked[-1] if ranked and ranked[-1].simulated is not None and ranked[-1].simulated <= usable else None
    log(
        f"the fastest layout that fits {gpu_gb:g} GiB ({size(usable)} usable, {HEADROOM:.0%} headroom) on {world} "
        f"GPU(s), by the time model's hours, the memory model pruning and the simulation deciding:"
    )
    for c in ranked if chosen is None else ranked[:-1]:
        why = (
            f"simulated {size(c.simulated)}" if c.simulated is not None else f"the memory model says {size(c.modelled)}"
        )
        log(f"  not {c.command_flags() or '(the defaults)'}: {hours(c.seconds)}, {why}")
    if chosen is None:
        log(f"  nothing fits {gpu_gb:g} GiB on {world} GPU(s)")
        return None
    log(
        f"  chosen: {chosen.command_flags() or '(the defaults)'}: {hours(chosen.seconds)}, simulated "
        f"{size(chosen.simulated)} (the memory model {size(chosen.modelled)})"
    )
    log(f"  {torchrun(world, command)} {chosen.command_flags()}".rstrip())
    return chosen


def shard_choices(world: int) -> list[int | None]:
    """FSDP over all ranks, and on more than one node HSDP with a node's GPUs a shard group."""
    return [None] + ([GPUS_PER_NODE] if world > GPUS_PER_NODE and world % GPUS_PER_NODE == 0 else [])


def choose_lm(
    config,
    kind: str,
    train_step: Callable,
    *,
    world: int,
    gpu_gb: float,
    batch: int,
    seq: int,
    steps: int,
    mean_tokens: int,
    bf16: bool = True,
    net_args: dict | None = None,
    peak_tflops: float = PEAK_TFLOPS,
    mfu: float = MFU,
    micros=(1, 2, 4, 8, 16),
    shards: list | None = None,
) -> list[Candidate]:
    """choose() for SFT (kind "sft") or the reward model ("rm", items are pairs): a run of
    `steps` steps of `batch` items on `world` GPUs, memory at the longest sequence (`seq`
    tokens), time at `mean_tokens` an item (--plan-tokens-per-item), over micro-batch size,
    activation checkpointing, --grad-sync and (more than a node) --shard-ranks (or only `shards`)."""
    per_item = 2 if kind == "rm" else 1
    candidates = []
    for micro in (m for m in micros if batch % (world * m) == 0):
        for ac in (False, True):
            for sync in ("every", "last"):
                for shard in shard_choices(world) if shards is None else shards:
                    net = Network(world, shard, **(net_args or {}))
                    t = training_step_seconds(
                        config,
                        world=world,
                        batch=batch * per_item,
                        micro_batch=micro * per_item,
                        seq_len=mean_tokens,
                        bf16=bf16,
                        activation_checkpointing=ac,
                        grad_sync=sync,
                        head=kind == "sft",
                        net=net,
                        peak_tflops=peak_tflops,
                        mfu=mfu,
                    )
                    m = training_memory(
                        config,
                        world=world,
                        micro_batch=micro * per_item,
                        seq_len=seq,
                        bf16=bf16,
                        activation_checkpointing=ac,
                        grad_sync=sync,
                        logits=kind == "sft",
                        shard=shard,
                    )
                    candidates.append(
                        Candidate(
                            {
                                "--micro-batch-size": micro,
                                "--activation-checkpointing": ac,
                                "--grad-sync": sync,
                                "--shard-ranks": shard,
                            },
                            steps * t["seconds"],
                            m["total"] * GIB,
                        )
                    )

    def simulate(c):
        f = c.flags
        return simulate_training(
            lambda: _lm(config, kind, f["--activation-checkpointing"]),
            lm_step(kind, seq, train_step),
            world=world,
            shard=f["--shard-ranks"],
            micro_batch=f["--micro-batch-size"],
            bf16=bf16,
            grad_sync=f["--grad-sync"],
        ).total

    return choose(candidates, usable_bytes(gpu_gb), simulate)


def choose_ppo(
    config,
    parts: PPOParts,
    *,
    world: int,
    gpu_gb: float,
    rounds: int,
    rollout_size: int,
    batch_size: int,
    ppo_epochs: int,
    prompt_len: int,
    new_tokens: int,
    trainable_blocks: int,
    net_args: dict | None = None,
    peak_tflops: float = PEAK_TFLOPS,
    mfu: float = MFU,
    hbm_tbps: float = HBM_TBPS,
    chunks=(8, 4, 2, 1),
) -> list[Candidate]:
    """choose() for PPO: `rounds` rounds on `world` GPUs, over the micro-batch size, the chunk
    size, --reshard-in-rollout, --reward-placement, --frozen-bf16 and (more than a node)
    --shard-ranks. The chunk sizes tried are the default (8) and smaller: a smaller chunk holds
    a smaller KV cache and decodes more steps."""
    per_rank = rollout_size // world
    candidates = []
    for micro in (m for m in (1, 2, 4, 8, 16) if batch_size % (world * m) == 0):
        for chunk in (c for c in chunks if c <= per_rank):
            for reshard in (False, True):
                for reward_sharded in (True, False):
                    for frozen_bf16 in (False, True):
                        for shard in shard_choices(world):
                            net = Network(world, shard, **(net_args or {}))
                            t = ppo_round_seconds(
                                config,
                                world=world,
                                rollout_size=rollout_size,
                                chunk_size=chunk,
                                batch_size=batch_size,
                                ppo_epochs=ppo_epochs,
                                prompt_len=prompt_len,
                                new_tokens=new_tokens,
                                trainable_blocks=trainable_blocks,
                                micro_batch=micro,
                                gathered_rollout=not reshard,
                                reward_sharded=reward_sharded,
                                net=net,
                                peak_tflops=peak_tflops,
                                mfu=mfu,
                                hbm_tbps=hbm_tbps,
                            )
                            m = ppo_memory(
                                config,
                                world=world,
                                chunk=chunk,
                                prompt_len=prompt_len,
                                new_tokens=new_tokens,
                                micro_batch=micro,
                                trainable_blocks=trainable_blocks,
                                gathered_rollout=not reshard,
                                reward_sharded=reward_sharded,
                                frozen_bf16=frozen_bf16,
                                shard=shard,
                            )
                            flags = {
                                "--micro-batch-size": micro,
                                "--chunk-size": chunk,
                                "--reshard-in-rollout": reshard,
                                "--reward-placement": "sharded" if reward_sharded else "replicated",
                                "--frozen-bf16": frozen_bf16,
                                "--shard-ranks": shard,
                            }
                            candidates.append(Candidate(flags, rounds * t["total"], m["total"] * GIB))

    def simulate(c):
        f = c.flags
        sim = simulate_ppo(
            config,
            parts,
            world=world,
            shard=f["--shard-ranks"],
            trainable_blocks=trainable_blocks,
            rollout_size=rollout_size,
            chunk_size=f["--chunk-size"],
            batch_size=batch_size,
            micro_batches=[f["--micro-batch-size"]],
            prompt_len=prompt_len,
            new_tokens=new_tokens,
            gathered_rollout=not f["--reshard-in-rollout"],
            reward_sharded=f["--reward-placement"] == "sharded",
            frozen_bf16=f["--frozen-bf16"],
        )
        c.measured = sim  # the dry run's tables show the chosen one's parts without simulating it again
        return max(m.total for m in sim.values())

    return choose(candidates, usable_bytes(gpu_gb), simulate)


# -- the dry runs ------------------------------------------------------------------------------------------------


def _table(rows: list[list], header: list[str]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    return "\n".join("  ".join(str(c).rjust(w) for c, w in zip(r, widths)) for r in [header, *rows])


SHOWN = (
    "weights",
    "optimizer",
    "grads",
    "gathered",
    "gathered grads",
    "replicated",
    "activations",
    "temporaries",
    "all-gather",
    "reduce-scatter",
    "inputs",
)


def measured_table(rows: list[tuple[list, Measurement, list]], header: list[str], after: list[str]) -> str:
    """Rows of (leading cells, a measurement, trailing cells): the categories any row holds and
    the total, in GiB (MiB when every total is under 1 GiB)."""
    shown = [c for c in SHOWN if any(m.parts.get(c) for _, m, _ in rows)]
    unit, scale = ("GiB", GIB) if max(m.total for _, m, _ in rows) >= GIB else ("MiB", 2**20)
    body = [
        [*lead, *(f"{m.parts.get(c, 0) / scale:.1f}" for c in shown), f"{m.total / scale:.1f}", *tail]
        for lead, m, tail in rows
    ]
    return f"per-rank {unit}\n" + _table(body, [*header, *shown, "total", *after])


def size(nbytes: float) -> str:
    return f"{nbytes / GIB:.1f} GiB" if nbytes >= GIB else f"{nbytes / 2**20:.1f} MiB"


def hours(seconds: float) -> str:
    return f"{seconds / 3600:,.1f} h" if seconds >= 360 else f"{seconds:,.0f} s"


def lm_dry_run(args, kind: str, train_step: Callable, inference: tuple = (), settings: str = ""):
    """`train_sft.py --dry-run` (kind "sft") and `train_rm.py --dry-run` ("rm"): the memory model
    for each micro-batch size with and without activation checkpointing; with --simulate the
    same rows measured (the trainer's `train_step`), and what inference on one GPU holds for
    evaluate.py and for the trainer's own `inference` rows ((command, sequences, new tokens,
    flags): train_rm.py sample's); then the time of the run at --mfu of --peak-tflops. `settings`:
    the run's own flags (given_settings), carried by the command it prints."""
    from pretrained import load_config

    from training import check_shard_ranks, check_split

    config = load_config(args.model)
    check_shard_ranks(args.world_size, args.shard_ranks)  # as the real run refuses them
    check_split(args, args.world_size)
    check_simulated_world(args)
    bf16 = not args.fp32
    seq = args.max_len or min(2048, config.max_position_embeddings)
    per_item = 2 if kind == "rm" else 1  # a reward model's item is a pair: chosen and rejected, one forward
    unit = "pairs" if kind == "rm" else "conversations"
    lora = (args.lora_rank, args.lora_alpha, args.lora_targets) if getattr(args, "lora_rank", 0) else None
    if lora:  # the memory model knows no adapters: only the simulation speaks for a LoRA run
        return lora_dry_run(args, kind, config, seq, bf16, lora, train_step)
    items = args.plan_items or (TABLE3_CONVERSATIONS if kind == "sft" else args.batch_size * 100)
    steps = args.epochs * items // args.batch_size
    peak = args.peak_tflops or PEAK_TFLOPS
    net = network(args)
    if args.simulate:  # the answer first, the tables it comes from after
        ranked = choose_lm(
            config,
            kind,
            train_step,
            world=args.world_size,
            gpu_gb=args.gpu_memory_gb,
            batch=args.batch_size,
            seq=seq,
            steps=steps,
            mean_tokens=args.plan_tokens_per_item,
            bf16=bf16,
            net_args=net_args(args),
            peak_tflops=peak,
            mfu=args.mfu,
        )
        print_choice(
            ranked,
            gpu_gb=args.gpu_memory_gb,
            world=args.world_size,
            command=f"{'train_sft' if kind == 'sft' else 'train_rm'}.py {settings}".rstrip(),
        )
        print()
    print(
        f"{args.model}: {config.num_params() / 1e9:.2f}B parameters, {args.world_size} ranks, sequences of {seq} "
        f"tokens, {'bf16' if bf16 else 'fp32'} compute, AdamW, "
        f"{f'HSDP (sharded over {args.shard_ranks})' if args.shard_ranks else 'FSDP'}"
        + (" (a reward model: chosen and rejected in one forward)" if kind == "rm" else "")
    )
    print(
        f"gradients reduce-scattered after {'every micro-batch' if args.grad_sync == 'every' else 'the last micro-batch'}"
        f" (--grad-sync {args.grad_sync})"
    )
    print(
        "the memory model, per-rank GiB (states: fp32 weights and Adam moments; grads: the gradient a rank holds "
        "between micro-batches; in-flight: the gathered blocks):"
    )
    print(
        f"per-rank GiB    states  grads  in-flight   activations AC off | on     total AC off | on   "
        f"fits in {args.gpu_memory_gb:g} GiB"
    )
    micros = (1, 2, 4, 8, 16)
    models = {}
    for micro in micros:
        off, on = models[micro] = [
            training_memory(
                config,
                world=args.world_size,
                micro_batch=micro * per_item,
                seq_len=seq,
                bf16=bf16,
                activation_checkpointing=ac,
                grad_sync=args.grad_sync,
                logits=kind == "sft",
                shard=args.shard_ranks,
            )
            for ac in (False, True)
        ]
        fits = " | ".join("yes" if m["total"] <= args.gpu_memory_gb else "no" for m in (off, on))
        print(
            f"micro-batch {micro:2d}  {off['states']:7.1f}  {off['grads']:5.1f}  {off['in_flight']:9.1f}  "
            f"{off['activations']:12.1f} | {on['activations']:5.1f}  {off['total']:12.1f} | {on['total']:5.1f}   {fits}"
        )
    acc = args.batch_size // args.world_size
    print(
        f"global batch {args.batch_size} = micro-batch x {args.world_size} ranks x accumulation; "
        f"e.g. micro-batch 4 -> {acc // 4} accumulation steps"
    )
    if args.simulate:
        print(
            f"\nsimulated: {'train_sft' if kind == 'sft' else 'train_rm'}.train_step and AdamW on fake tensors over "
            f"{args.world_size} fake ranks; FSDPMemTracker's "
            f"peak on a rank, GiB:"
        )
        rows = []
        for micro in args.simulate_micro_batches or micros:
            for ac in (False, True):
                m = simulate_training(
                    lambda: _lm(config, kind, ac),
                    lm_step(kind, seq, train_step),
                    world=args.world_size,
                    shard=args.shard_ranks,
                    micro_batch=micro,
                    bf16=bf16,
                    grad_sync=args.grad_sync,
                )
                modelled = models.get(micro, [None, None])[ac]
                vs = f"{100 * (modelled['total'] * GIB / m.total - 1):+.0f}%" if modelled else "-"
                rows.append(
                    ([micro, "on" if ac else "off"], m, [vs, "yes" if m.total / GIB <= args.gpu_memory_gb else "no"])
                )
                print(
                    f"  micro-batch {micro}, activation checkpointing {'on' if ac else 'off'}: {m.total / GIB:.2f} GiB",
                    flush=True,
                )
        print(measured_table(rows, ["micro-batch", "AC"], ["model vs. this", f"fits {args.gpu_memory_gb:g} GiB"]))
        # What inference on one GPU holds (the whole model, bf16, no FSDP), at each command's
        # defaults and the longest prompts their budget allows (the context less the new tokens).
        import evaluate

        context = config.max_position_embeddings
        uses = [
            *inference,
            ("evaluate.py bench|answer", evaluate.BATCH_SIZE, 256, f"--batch-size {evaluate.BATCH_SIZE}"),
        ]
        rows = [
            (
                [command, what, f"{context - new:,} + {new}"],
                simulate_sampling(config, sequences=n, prompt_len=context - new, new_tokens=new),
                [],
            )
            for command, n, new, what in uses
        ]
        print("\nsimulated: sampling on one GPU (generate.decode_steps on the whole bf16 model, torch's MemTracker):")
        print(measured_table(rows, ["command", "sequences", "tokens"], []))
    # The time of the run.
    tokens_per_item = args.plan_tokens_per_item * per_item
    flops = (
        train_flops(
            config,
            args.batch_size * tokens_per_item,
            args.plan_tokens_per_item,
            args.activation_checkpointing,
            head=kind == "sft",
        )
        * steps
    )
    t = training_step_seconds(
        config,
        world=args.world_size,
        batch=args.batch_size * per_item,
        micro_batch=args.micro_batch_size * per_item,
        seq_len=args.plan_tokens_per_item,
        bf16=bf16,
        activation_checkpointing=args.activation_checkpointing,
        grad_sync=args.grad_sync,
        head=kind == "sft",
        net=net,
        peak_tflops=peak,
        mfu=args.mfu,
    )
    seconds = steps * t["seconds"]
    print(
        f"\ntime: {args.epochs} epoch(s) of {items:,} {unit} of ~{args.plan_tokens_per_item:,} tokens each "
        f"(--plan-items, --plan-tokens-per-item), {steps:,} steps of {args.batch_size}: {flops:.3g} FLOPs "
        f"({flops / steps:.3g} a step{', activation checkpointing recomputing the blocks' if args.activation_checkpointing else ''}); "
        f"at {args.mfu:.0%} of {peak:g} TFLOP/s on {args.world_size} GPUs: {hours(seconds)} "
        f"({seconds * args.world_size / 3600:,.0f} GPU-hours); a step computes {t['compute']:.2f} s and FSDP's "
        f"collectives take {t['collectives']:.2f} s at --micro-batch-size {args.micro_batch_size} "
        f"({net.intra_gbps:g} GB/s in a node, {net.inter_gbps:g} across nodes; overlapped, the slower counts)"
    )


def net_args(args) -> dict:
    return {"intra_gbps": args.intra_node_gbps, "inter_gbps": args.inter_node_gbps}


def network(args) -> Network:
    return Network(args.world_size, args.shard_ranks, **net_args(args))


# Paper Table 3: the four medical parts of the SFT mix, 61,400 + 69,768 + 68,888 + 25,986
# conversations (the general-domain Alpaca and ShareGPT data come on top; their share is not given).
TABLE3_CONVERSATIONS = 61_400 + 69_768 + 68_888 + 25_986


def _lm(config, kind: str, activation_checkpointing: bool, lora: tuple | None = None, bf16: bool = False):
    from lora import add_lora
    from model import RewardModel, Transformer
    from training import frozen_in_bf16

    model = Transformer(config) if kind == "sft" else RewardModel(config)
    (model if kind == "sft" else model.trunk).activation_checkpointing = activation_checkpointing
    if lora:  # as the trainers add it: adapters trainable, the rest frozen (the RM's score head trains too)
        add_lora(model, *lora)
        if kind == "rm":
            model.score_head.requires_grad_(True)
        if bf16:  # and store it: the frozen weights in bf16 (training.shard_and_load)
            frozen_in_bf16(model)
    return model


def lora_dry_run(args, kind: str, config, seq: int, bf16: bool, lora: tuple, train_step: Callable):
    """A LoRA run's dry run: its step simulated at each micro-batch size, with and without
    activation checkpointing, on --world-size fake ranks (1: one GPU)."""
    rank, alpha, targets = lora
    with torch.device("meta"):
        trainable = sum(p.numel() for p in _lm(config, kind, False, lora).parameters() if p.requires_grad)
    print(
        f"{args.model}: {config.num_params() / 1e9:.2f}B parameters, LoRA rank {rank} (alpha {alpha:g}) on "
        f"{' '.join(targets)}: {trainable / 1e6:.2f}M trainable; {args.world_size} rank(s), sequences of {seq} "
        f"tokens, {'bf16' if bf16 else 'fp32'} compute, the frozen weights stored in {'bf16' if bf16 else 'fp32'} and "
        "sharded by FSDP"
    )
    print(
        f"\nsimulated: {'train_sft' if kind == 'sft' else 'train_rm'}.train_step and AdamW on fake tensors over "
        f"{args.world_size} fake rank(s); FSDPMemTracker's peak on a rank, GiB:"
    )
    rows = []
    for micro in args.simulate_micro_batches or (1, 2, 4):
        for ac in (False, True):
            m = simulate_training(
                lambda: _lm(config, kind, ac, lora, bf16),
                lm_step(kind, seq, train_step),
                world=args.world_size,
                micro_batch=micro,
                bf16=bf16,
                grad_sync=args.grad_sync,
            )
            rows.append(([micro, "on" if ac else "off"], m, ["yes" if m.total / GIB <= args.gpu_memory_gb else "no"]))
            print(
                f"  micro-batch {micro}, activation checkpointing {'on' if ac else 'off'}: {m.total / GIB:.2f} GiB",
                flush=True,
            )
    print(measured_table(rows, ["micro-batch", "AC"], [f"fits {args.gpu_memory_gb:g} GiB"]))


def lm_step(kind: str, seq: int, train_step: Callable):
    """The trainer's own step, which it hands over (train_sft.train_step, train_rm.train_step:
    plan.py imports no trainer), on n items of `seq` tokens (the worst case: every one full),
    as measure_training calls it."""
    from data.template import Rendered

    def step(model, d, n, **kw):
        if kind == "sft":
            return train_step(model, d, [Rendered([3] * (seq + 1), [3] * (seq + 1))] * n, pad_id=0, **kw)
        return train_step(
            model, d, [{"chosen_ids": [3] * seq, "rejected_ids": [4] * seq}] * n, pad_id=0, margin=0.0, **kw
        )

    return step


# FSDP chunks every parameter once a rank, so a simulation's cost grows with its fake ranks; the
# memory model without --simulate takes any --world-size.
SIMULATE_MAX_RANKS = 1024


def check_simulated_world(args):
    if args.simulate and args.world_size > SIMULATE_MAX_RANKS:
        raise SystemExit(
            f"--simulate --world-size {args.world_size}: at most {SIMULATE_MAX_RANKS} fake ranks (FSDP chunks every "
            "parameter once a rank, so the simulation's time grows with them); without --simulate any --world-size"
        )


def add_plan_args(
    p,
    *,
    items_help: str | None = None,
    length_flag: str = "--plan-tokens-per-item",
    length_help: str = "mean tokens of one (assumed; `python -m data stats --tokenizer` measures them)",
):
    """The dry run's flags, for every trainer (given_settings leaves them out of the command it
    prints: --peak-tflops aside, which a real run reads too)."""
    p.add_argument("--dry-run", action="store_true", help="print per-rank memory and the run's time; train nothing")
    p.add_argument(
        "--simulate",
        action="store_true",
        help="with --dry-run: measure memory by running this code's steps on fake tensors (seconds per row at 13B)",
    )
    p.add_argument(
        "--simulate-micro-batches",
        type=COUNT,
        nargs="+",
        help="with --simulate: only these micro-batch sizes (PPO's default: the smallest and those the memory "
        "model does not rule out)",
    )
    p.add_argument("--world-size", type=COUNT, default=8, help="with --dry-run: ranks to plan for")
    p.add_argument("--gpu-memory-gb", type=POSITIVE, default=80.0, help="with --dry-run: memory per GPU")
    p.add_argument(
        "--peak-tflops",
        type=POSITIVE,
        help=f"the accelerator's peak dense bf16 TFLOP/s: a run reports MFU against it; the dry run's time "
        f"uses it (default there: {PEAK_TFLOPS:g}, the A100's)",
    )
    p.add_argument("--mfu", type=SHARE, default=MFU, help="with --dry-run: the share of that peak a step reaches")
    p.add_argument("--hbm-tbps", type=POSITIVE, default=HBM_TBPS, help="with --dry-run: memory bandwidth, TB/s")
    p.add_argument(
        "--intra-node-gbps",
        type=POSITIVE,
        default=INTRA_NODE_GBPS,
        help=f"with --dry-run: FSDP's all-gather bandwidth inside a node of {GPUS_PER_NODE} GPUs, GB/s a GPU",
    )
    p.add_argument(
        "--inter-node-gbps",
        type=POSITIVE,
        default=INTER_NODE_GBPS,
        help="with --dry-run: the same across nodes, GB/s a GPU",
    )
    if items_help:
        p.add_argument("--plan-items", type=COUNT, help=f"with --dry-run: {items_help}")
    p.add_argument(length_flag, type=COUNT, default=1024, help=f"with --dry-run: {length_help}")


# The dry run's own settings (add_plan_args), which a real run does not take.
PLAN_DESTS = {
    "dry_run",
    "simulate",
    "simulate_micro_batches",
    "world_size",
    "gpu_memory_gb",
    "mfu",
    "hbm_tbps",
    "intra_node_gbps",
    "inter_node_gbps",
    "plan_items",
    "plan_tokens_per_item",
    "plan_prompt_tokens",
}


def given_settings(p, args) -> str:
    """The flags of `args` that differ from the parser's defaults, as a command line gives
    them: what the dry run simulated and the command it prints must carry (--max-len,
    --batch-size, ...), but for the dry run's own flags and the layout it chooses
    (Candidate.DEFAULTS), which the printed command sets itself."""
    flags = []
    for action in p._actions:
        if not action.option_strings or action.dest in PLAN_DESTS or action.dest == "help":
            continue
        flag = max(action.option_strings, key=len)
        value = getattr(args, action.dest, None)
        if flag in Candidate.DEFAULTS or value is None or value == action.default:
            continue
        if action.nargs == 0:  # a switch (store_true / store_false)
            flags.append(flag)
        elif isinstance(value, (list, tuple)):
            flags.append(" ".join([flag, *(shlex.quote(str(v)) for v in value)]))
        else:
            flags.append(f"{flag} {shlex.quote(str(value))}")
    return " ".join(flags)


def ppo_dry_run(args, parts: PPOParts, settings: str = ""):
    """`train_ppo.py --dry-run`: the memory model of PPO's layout for each micro-batch size; with
    --simulate each part of a round (train_ppo.py's `parts`) measured; then the time of a round
    and of the run. `settings`: the run's own flags (given_settings), carried by the command it
    prints."""
    from pretrained import load_config

    from training import check_shard_ranks, check_split

    config = load_config(args.policy)
    world, prompt_len = args.world_size, args.plan_prompt_tokens
    check_shard_ranks(world, args.shard_ranks)  # as the real run refuses them
    check_split(args, world)
    check_simulated_world(args)
    peak_tflops = args.peak_tflops or PEAK_TFLOPS
    steps_per_round = args.ppo_epochs * args.rollout_size // args.batch_size
    rounds = math.ceil(args.max_steps / steps_per_round)
    if args.simulate:  # the answer first, the tables it comes from after
        ranked = choose_ppo(
            config,
            parts,
            world=world,
            gpu_gb=args.gpu_memory_gb,
            rounds=rounds,
            rollout_size=args.rollout_size,
            batch_size=args.batch_size,
            ppo_epochs=args.ppo_epochs,
            prompt_len=prompt_len,
            new_tokens=args.max_new_tokens,
            trainable_blocks=args.trainable_blocks,
            net_args=net_args(args),
            peak_tflops=peak_tflops,
            mfu=args.mfu,
            hbm_tbps=args.hbm_tbps,
        )
        print_choice(ranked, gpu_gb=args.gpu_memory_gb, world=world, command=f"train_ppo.py {settings}".rstrip())
        print()
    print(
        f"{args.policy}: {config.num_params() / 1e9:.2f}B parameters; policy + value head (last "
        f"{args.trainable_blocks} blocks trained), π0's top and a reward model of the same size; "
        f"{world} ranks, bf16 compute; prompts of {prompt_len:,} tokens + {args.max_new_tokens} new"
    )
    cols = ("frozen", "trainable", "reference", "reward", "in_flight", "kv_cache", "activations", "total")
    print("the memory model:")
    print("per-rank GiB   " + "  ".join(f"{c:>11}" for c in cols) + f"   fits in {args.gpu_memory_gb:g} GiB")
    # A micro-batch holds at most a rank's share of a minibatch: --batch-size / ranks.
    micros = [m for m in (1, 2, 4, 8, 16) if m <= max(1, args.batch_size // world)]
    models = {}
    for micro in micros:
        m = models[micro] = ppo_memory(
            config,
            world=world,
            chunk=args.chunk_size,
            prompt_len=prompt_len,
            new_tokens=args.max_new_tokens,
            micro_batch=micro,
            trainable_blocks=args.trainable_blocks,
            gathered_rollout=not args.reshard_in_rollout,
            reward_sharded=args.reward_placement == "sharded",
            frozen_bf16=args.frozen_bf16,
            shard=args.shard_ranks,
        )
        print(
            f"micro-batch {micro}  "
            + "  ".join(f"{m[c]:11.1f}" for c in cols)
            + f"   {'yes' if m['total'] <= args.gpu_memory_gb else 'no'}"
        )
    in_flight = (
        "two blocks and the root (--reshard-in-rollout)"
        if args.reshard_in_rollout
        else "the whole policy, kept gathered through the rollout (--reshard-in-rollout: two blocks and the root)"
    )
    print(
        f"(chunks of {args.chunk_size} sequences generated together; in_flight: {in_flight}; the reward model "
        f"{args.reward_placement}, --reward-placement)"
    )
    if args.simulate:
        print(
            f"\nsimulated: a round of train_ppo.py on fake tensors over {world} fake ranks (every response "
            f"{args.max_new_tokens} tokens); FSDPMemTracker's peak on a rank in each part:",
            flush=True,
        )
        # This layout at the sizes the chooser simulated is not simulated again: each layout and
        # micro-batch size once.
        layout = {
            "--chunk-size": args.chunk_size,
            "--reshard-in-rollout": args.reshard_in_rollout,
            "--reward-placement": args.reward_placement,
            "--frozen-bf16": args.frozen_bf16,
            "--shard-ranks": args.shard_ranks,
        }
        sim = {}
        for c in ranked:
            if c.measured and all(c.flags[k] == v for k, v in layout.items()):
                sim.update(c.measured)
        # By default the sizes the memory model does not rule out (as the chooser prunes), and
        # the smallest: a size it puts far over the GPU is not worth a simulation.
        chosen = args.simulate_micro_batches or [
            m for m in micros if m == micros[0] or models[m]["total"] <= args.gpu_memory_gb * (1 + MODEL_SLACK)
        ]
        missing = [m for m in chosen if ("update", m) not in sim]
        if missing:
            sim.update(
                simulate_ppo(
                    config,
                    parts,
                    world=world,
                    trainable_blocks=args.trainable_blocks,
                    rollout_size=args.rollout_size,
                    chunk_size=args.chunk_size,
                    batch_size=args.batch_size,
                    micro_batches=missing,
                    prompt_len=prompt_len,
                    new_tokens=args.max_new_tokens,
                    gathered_rollout=not args.reshard_in_rollout,
                    reward_sharded=args.reward_placement == "sharded",
                    frozen_bf16=args.frozen_bf16,
                    shard=args.shard_ranks,
                )
            )
        rows = [([name, "-"], sim[name], []) for name in ("rollout", "scoring")]
        rows += [([name, micro], sim[name, micro], []) for micro in chosen for name in ("experience", "update")]
        print(measured_table(rows, ["part", "micro-batch"], []))
        for micro in chosen:
            peak = max(m.total for k, m in sim.items() if not isinstance(k, tuple) or k[1] == micro)
            modelled = models.get(micro)
            vs = (
                f"; the memory model says {size(modelled['total'] * GIB)} ({100 * (modelled['total'] * GIB / peak - 1):+.0f}%)"
                if modelled
                else ""
            )
            print(
                f"micro-batch {micro}: the round's peak {size(peak)} "
                f"({'fits' if peak <= args.gpu_memory_gb * GIB else 'does not fit'} {args.gpu_memory_gb:g} GiB){vs}"
            )
    t = ppo_round_seconds(
        config,
        world=world,
        rollout_size=args.rollout_size,
        chunk_size=args.chunk_size,
        batch_size=args.batch_size,
        ppo_epochs=args.ppo_epochs,
        prompt_len=prompt_len,
        new_tokens=args.max_new_tokens,
        trainable_blocks=args.trainable_blocks,
        micro_batch=args.micro_batch_size,
        gathered_rollout=not args.reshard_in_rollout,
        reward_sharded=args.reward_placement == "sharded",
        net=network(args),
        peak_tflops=peak_tflops,
        mfu=args.mfu,
        hbm_tbps=args.hbm_tbps,
    )
    parts = ", ".join(f"{k} {t[k]:.1f} s" for k in ("rollout", "scoring", "experience", "update"))
    parts += f"; the rollout {t['prefills']} prefills and {t['decoding_steps']} decoding steps a rank"
    print(
        f"\ntime of a round ({args.rollout_size} experiences, {t['steps']} optimizer steps; decoding memory-bound at "
        f"{MBU:.0%} of {args.hbm_tbps:g} TB/s, the rest at {args.mfu:.0%} of {peak_tflops:g} TFLOP/s, FSDP's "
        f"collectives at {args.intra_node_gbps:g} GB/s in a node and {args.inter_node_gbps:g} across): "
        f"{t['total']:.1f} s ({parts}); --max-steps {args.max_steps:,} = {rounds:,} rounds = "
        f"{hours(rounds * t['total'])} on {world} GPUs ({rounds * t['total'] * world / 3600:,.0f} GPU-hours)"
    )
