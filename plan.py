"""Will it fit, and how long will it take? The paper's runs planned on a CPU, with no GPU.

    python train_sft.py --model ziya-13b --dry-run --world-size 8             # the memory model, instantly
    python train_sft.py --model ziya-13b --dry-run --simulate --world-size 8  # measured: this code's steps
    python train_rm.py  --model ziya-13b --dry-run [--simulate]
    python train_ppo.py --policy ziya-13b --dry-run [--simulate]

Four parts, four files: simulate.py measures, costs.py is the arithmetic (the memory model and
the time model), choose.py picks a layout, and this file runs the dry runs the trainers'
--dry-run flags start.

Measured means the trainer's own step at full size: the trainer's train_step (its loss
and AdamW for SFT and the reward model; for PPO a round as train_ppo.py runs it (the rollout with
the policy kept gathered, the reward model's scoring, the experience pass, an update step).
They run on fake tensors (torch's FakeTensorMode: every tensor has its shape, dtype and device
but no storage) over `world` ranks that exist only in this process (torch's fake process group:
collectives that move nothing), the model sharded by distributed.shard as a run shards it, while
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

import math
import shlex
from dataclasses import dataclass
from typing import Callable

import torch

from safety import COUNT, POSITIVE, SHARE

from costs import (
    GIB,
    GPUS_PER_NODE,
    HBM_TBPS,
    INTER_NODE_GBPS,
    INTRA_NODE_GBPS,
    MBU,
    MFU,
    Network,
    PEAK_TFLOPS,
    ppo_memory,
    ppo_round_seconds,
    train_flops,
    training_memory,
    training_step_seconds,
    hours,
    size,
)
from choose import LAYOUT_FLAGS, MODEL_SLACK, choose_lm, choose_ppo, print_choice
from simulate import Measurement, PPOParts, lm_model, lm_step, simulate_ppo, simulate_sampling, simulate_training


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


def lm_dry_run(args, kind: str, train_step: Callable, settings: Settings, inference: tuple = ()):
    """`train_sft.py --dry-run` (kind "sft") and `train_rm.py --dry-run` ("rm"): the memory model
    for each micro-batch size with and without activation checkpointing; with --simulate the
    same rows measured (the trainer's `train_step`), and what inference on one GPU holds for
    evaluate.py and for the trainer's own `inference` rows ((command, sequences, new tokens,
    flags): train_rm.py sample's); then the time of the run at --mfu of --peak-tflops. `settings`:
    the run's own flags (given_settings), carried by the command it prints."""
    from pretrained import load_config

    from distributed import check_shard_ranks, check_split

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
        lm_choice(args, kind, config, train_step, seq=seq, steps=steps, bf16=bf16, peak=peak, settings=settings)
    models = lm_memory_table(args, kind, config, seq=seq, bf16=bf16, per_item=per_item)
    if args.simulate:
        lm_simulated(args, kind, config, train_step, models, seq=seq, bf16=bf16, inference=inference)
    lm_time(args, kind, config, items=items, steps=steps, per_item=per_item, unit=unit, bf16=bf16, peak=peak, net=net)


def lm_choice(
    args, kind: str, config, train_step: Callable, *, seq: int, steps: int, bf16: bool, peak: float, settings: Settings
):
    """With --simulate, first: the fastest layout that fits (choose_lm), and the command to run it."""
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
        defaults=settings.defaults,
    )
    print_choice(
        ranked,
        gpu_gb=args.gpu_memory_gb,
        world=args.world_size,
        command=f"{'train_sft' if kind == 'sft' else 'train_rm'}.py {settings}".rstrip(),
    )
    print()


def lm_memory_table(args, kind: str, config, *, seq: int, bf16: bool, per_item: int) -> dict:
    """The memory model's table, a row per micro-batch size, activation checkpointing off and
    on -> {micro-batch: [off, on]} for the simulated rows to be held against."""
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
    return models


def lm_simulated(
    args, kind: str, config, train_step: Callable, models: dict, *, seq: int, bf16: bool, inference: tuple
):
    """--simulate: the same rows measured (the trainer's train_step on fake tensors), and what
    sampling on one GPU holds for evaluate.py and the trainer's own `inference` rows."""
    print(
        f"\nsimulated: {'train_sft' if kind == 'sft' else 'train_rm'}.train_step and AdamW on fake tensors over "
        f"{args.world_size} fake ranks; FSDPMemTracker's "
        f"peak on a rank, GiB:"
    )
    rows = []
    for micro in args.simulate_micro_batches or list(models):
        for ac in (False, True):
            m = simulate_training(
                lambda: lm_model(config, kind, ac),
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
    uses = [*inference, ("evaluate.py bench|answer", evaluate.BATCH_SIZE, 256, f"--batch-size {evaluate.BATCH_SIZE}")]
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


def lm_time(args, kind: str, config, *, items: int, steps: int, per_item: int, unit: str, bf16: bool, peak: float, net):
    """The time of the run at --mfu of --peak-tflops, FSDP's collectives over `net`."""
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


def lora_dry_run(args, kind: str, config, seq: int, bf16: bool, lora: tuple, train_step: Callable):
    """A LoRA run's dry run: its step simulated at each micro-batch size, with and without
    activation checkpointing, on --world-size fake ranks (1: one GPU)."""
    rank, alpha, targets = lora
    with torch.device("meta"):
        trainable = sum(p.numel() for p in lm_model(config, kind, False, lora).parameters() if p.requires_grad)
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
                lambda: lm_model(config, kind, ac, lora, bf16),
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


@dataclass
class Settings:
    """What the dry run takes of a trainer's command line (given_settings): its own flags, as a
    command line gives them (str()), and the trainer's defaults of the layout flags."""

    flags: str
    defaults: dict

    def __str__(self) -> str:
        return self.flags


def layout_defaults(p) -> dict:
    """A trainer's own defaults of the flags a layout sets (choose.LAYOUT_FLAGS), read from its
    parser: the chooser prints only the flags a layout changes from them."""
    return {
        flag: action.default
        for action in p._actions
        for flag in [max(action.option_strings, key=len, default="")]
        if flag in LAYOUT_FLAGS
    }


def given_settings(p, args) -> Settings:
    """The flags of `args` that differ from the parser's defaults, as a command line gives
    them: what the dry run simulated and the command it prints must carry (--max-len,
    --batch-size, ...), but for the dry run's own flags and the layout it chooses
    (choose.LAYOUT_FLAGS), which the printed command sets itself; and the parser's defaults of
    those layout flags."""
    flags = []
    for action in p._actions:
        if not action.option_strings or action.dest in PLAN_DESTS or action.dest == "help":
            continue
        flag = max(action.option_strings, key=len)
        value = getattr(args, action.dest, None)
        if flag in LAYOUT_FLAGS or value is None or value == action.default:
            continue
        if action.nargs == 0:  # a switch (store_true / store_false)
            flags.append(flag)
        elif isinstance(value, (list, tuple)):
            flags.append(" ".join([flag, *(shlex.quote(str(v)) for v in value)]))
        else:
            flags.append(f"{flag} {shlex.quote(str(value))}")
    return Settings(" ".join(flags), layout_defaults(p))


def ppo_dry_run(args, parts: PPOParts, settings: Settings):
    """`train_ppo.py --dry-run`: the memory model of PPO's layout for each micro-batch size; with
    --simulate each part of a round (train_ppo.py's `parts`) measured; then the time of a round
    and of the run. `settings`: the run's own flags (given_settings), carried by the command it
    prints."""
    from pretrained import load_config

    from distributed import check_shard_ranks, check_split

    config = load_config(args.policy)
    world = args.world_size
    check_shard_ranks(world, args.shard_ranks)  # as the real run refuses them
    check_split(args, world)
    check_simulated_world(args)
    peak_tflops = args.peak_tflops or PEAK_TFLOPS
    steps_per_round = args.ppo_epochs * args.rollout_size // args.batch_size
    rounds = math.ceil(args.max_steps / steps_per_round)
    ranked = (
        ppo_choice(args, config, parts, rounds=rounds, peak_tflops=peak_tflops, settings=settings)
        if args.simulate
        else []
    )
    micros, models = ppo_memory_table(args, config)
    if args.simulate:
        ppo_simulated(args, config, parts, ranked, micros, models)
    ppo_time(args, config, rounds=rounds, peak_tflops=peak_tflops)


def ppo_choice(args, config, parts: PPOParts, *, rounds: int, peak_tflops: float, settings: Settings) -> list:
    """With --simulate, first: the fastest layout that fits (choose_ppo) and the command to run
    it -> the ranking, whose simulated candidates the tables after reuse."""
    world, prompt_len = args.world_size, args.plan_prompt_tokens
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
        score_batch_size=args.score_batch_size,
        bottom_batch_size=args.bottom_batch_size,
        net_args=net_args(args),
        peak_tflops=peak_tflops,
        mfu=args.mfu,
        hbm_tbps=args.hbm_tbps,
        defaults=settings.defaults,
    )
    print_choice(ranked, gpu_gb=args.gpu_memory_gb, world=world, command=f"train_ppo.py {settings}".rstrip())
    print()
    return ranked


def ppo_memory_table(args, config) -> tuple[list, dict]:
    """The memory model's table, a row per micro-batch size -> (the sizes, {size: the model's parts})."""
    world, prompt_len = args.world_size, args.plan_prompt_tokens
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
    return micros, models


def ppo_simulated(args, config, parts: PPOParts, ranked: list, micros: list, models: dict):
    """--simulate: each part of a round measured (train_ppo.py's own functions on fake tensors),
    the layout's sizes the chooser simulated not simulated again."""
    world, prompt_len = args.world_size, args.plan_prompt_tokens
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
                score_batch_size=args.score_batch_size,
                bottom_batch_size=args.bottom_batch_size,
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


def ppo_time(args, config, *, rounds: int, peak_tflops: float):
    """The time of a round and of the run: the time model over the layout's network."""
    world, prompt_len = args.world_size, args.plan_prompt_tokens
    t = ppo_round_seconds(
        config,
        world=world,
        rollout_size=args.rollout_size,
        chunk_size=args.chunk_size,
        score_batch_size=args.score_batch_size,
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
