"""The measurement behind plan.py's dry runs: the trainers' own steps at full size, on fake
tensors over fake ranks, followed by FSDPMemTracker.

Measured means the trainer's own step at full size: the trainer's train_step (its loss and
AdamW for SFT and the reward model; for PPO a round as train_ppo.py runs it: the rollout with
the policy kept gathered, the reward model's scoring, the experience pass, an update step).
They run on fake tensors (torch's FakeTensorMode: every tensor has its shape, dtype and device
but no storage) over `world` ranks that exist only in this process (torch's fake process group:
collectives that move nothing), the model sharded by distributed.shard as a run shards it, while
torch's FSDPMemTracker follows every tensor rank 0 holds and keeps the peak by category. A 13B
step takes seconds of one CPU core and no memory to speak of. plan.py's docstring says what the
measurement leaves out and what it needs of the code it runs.
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist


# -- fake ranks, fake tensors, a tracker ----------------------------------------------------------------


@contextlib.contextmanager
def fake_ranks(world: int, shard: int | None = None):
    """`world` ranks inside this process, this one rank 0, and tensors without storage: yields
    (distributed.Distributed, the device mesh for distributed.shard). shard (--shard-ranks): the
    model sharded over groups of that many ranks and replicated across them (HSDP, a 2-D
    mesh, distributed.device_mesh); None or `world`: over all of them. The mesh is built before
    fake mode is entered (a mesh reads its ranks' numbers back from a tensor)."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from distributed import Distributed, device_mesh

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
    from training import make_optimizer
    from distributed import shard

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
    generate_round: Callable  # the rollout's sampling (generate.decode_steps' queue), as train_ppo.rollout runs it
    rollout_settings: type  # RolloutSettings: `.of(args)`, the flags generate_round reads
    update_settings: type  # UpdateSettings: `.of(args)`, the flags update_step reads
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
    score_batch_size: int | None = None,
    bottom_batch_size: int | None = None,
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
                      False; generate.decode_steps' queue, its KV cache of --chunk-size rows) on one
                      wave of rows, each response `rollout_steps` tokens long (ROLLOUT_STEPS);
                      None: this rank's whole share, every response new_tokens long
        "scoring"     the reward model on a batch of --score-batch-size (RewardModel.score_ids)
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
    loss = {
        k: v for k, v in parts.settings.items() if k not in ("init_kl_coef", "score_batch_size", "bottom_batch_size")
    }
    args = SimpleNamespace(
        batch_size=batch_size,
        micro_batch_size=micro_batches[0],
        seed=0,
        chunk_size=chunk_size,
        score_batch_size=score_batch_size or parts.settings["score_batch_size"],
        bottom_batch_size=bottom_batch_size or parts.settings["bottom_batch_size"],
        grad_sync="every",
        ppo_epochs=1,  # update_step's one step; the settings' other flag
        unfinished_penalty=0.0,
        **loss,
    )
    tok = StandInTokenizer(config.vocab_size)
    prompt, response = [1] + [3] * (prompt_len - 1), [3] * new_tokens
    model, ref = parts.build_empty(
        config, d, trainable_blocks=trainable_blocks, bf16=bf16, frozen_bf16=frozen_bf16, mesh=mesh
    )
    rm = parts.reward_empty(config, d, compute, sharded=reward_sharded, mesh=mesh)  # as train_ppo loads it
    fill_(model, ref, rm)
    opt = make_optimizer(model, 1e-6, 0.0)
    out = experience_and_update(
        d, parts, (model, ref, rm, opt), args, tok, prompt, response, rollout_size, micro_batches
    )
    out.update(
        rollout_and_scoring(
            d,
            parts,
            (model, ref, rm, opt),
            args,
            tok,
            prompt,
            response,
            rollout_size=rollout_size,
            new_tokens=new_tokens,
            chunk_size=chunk_size,
            rollout_steps=rollout_steps,
            gathered_rollout=gathered_rollout,
            reward_sharded=reward_sharded,
        )
    )
    return out


def experience_and_update(
    d, parts: PPOParts, modules: tuple, args, tok, prompt: list, response: list, rollout_size: int, micro_batches: list
) -> dict:
    """measure_ppo's ("experience", m) and ("update", m) parts for each micro-batch size m, on its
    modules (model, ref, rm, opt): each run once untracked first (Adam's state, warm caches)."""
    model, ref, rm, opt = modules
    out = {}
    exps = [parts.experience(prompt, response, True) for _ in range(rollout_size)]
    batches = parts.minibatches(len(exps), args.batch_size, 0, 0)
    replicated = (rm, ref)

    def experience():
        for e in exps:
            e.bottom_out = None  # each pass keeps its own, as each round does
        parts.make_experience(
            model,
            ref,
            exps,
            batches,
            tok,
            d,
            parts.settings["init_kl_coef"],
            micro_batch_size=args.micro_batch_size,
            bottom_batch_size=args.bottom_batch_size,
        )

    def update():
        parts.update_step(model, opt, exps, batches[0], tok, parts.update_settings.of(args), d, {})

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
    return out


def rollout_and_scoring(
    d,
    parts: PPOParts,
    modules: tuple,
    args,
    tok,
    prompt: list,
    response: list,
    *,
    rollout_size: int,
    new_tokens: int,
    chunk_size: int,
    rollout_steps: int | None,
    gathered_rollout: bool,
    reward_sharded: bool,
) -> dict:
    """measure_ppo's "rollout" and "scoring" parts, on its modules (model, ref, rm, opt)."""
    model, ref, rm, opt = modules
    replicated, out = (rm, ref), {}
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
        parts.generate_round(model, round_prompts, tok, parts.rollout_settings.of(args), d, 0, readback=readback)
    chunk = [prompt] * min(args.score_batch_size, share)
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


# -- the supervised trainers' models and steps, as the simulation runs them -----------------------------


def lm_model(config, kind: str, activation_checkpointing: bool, lora: tuple | None = None, bf16: bool = False):
    from lora import add_lora
    from model import RewardModel, Transformer
    from distributed import frozen_in_bf16

    model = Transformer(config) if kind == "sft" else RewardModel(config)
    (model if kind == "sft" else model.trunk).activation_checkpointing = activation_checkpointing
    if lora:  # as the trainers add it: adapters trainable, the rest frozen (the RM's score head trains too)
        add_lora(model, *lora)
        if kind == "rm":
            model.score_head.requires_grad_(True)
        if bf16:  # and store it: the frozen weights in bf16 (distributed.shard_and_load)
            frozen_in_bf16(model)
    return model


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
