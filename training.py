"""What the three trainers (SFT, reward model, PPO) share, written once.

    Distributed     process group (gloo on CPU, nccl on GPU), rank, world size, device
    shard           FSDP2: fully_shard on each transformer block, then on the root
    cosine_lr       linear warmup then cosine decay
    make_optimizer  AdamW, weight decay on matrices only
    accumulate      one global batch: micro-batches, backward, gradient norm and clipping
    train_loop      the loop every trainer runs: schedule, steps, validation, best/, state/, final/
    TrainState      the resumable state: model + optimizer (sharded, torch.distributed.checkpoint),
                    step, sampler position, RNG, best validation score; written atomically
    save_hf         gather the full weights and write them with Transformer.save_pretrained
    MetricsLog      one JSON object per line in OUT/metrics.jsonl, from rank 0

FSDP2 stands in for the paper's ZeRO (App. E: ZeRO on 8 A100s): parameters, gradients and
optimizer states are sharded across ranks, and each block's weights are gathered only while it
runs. A run always has a process group, a single process too (world size 1, through a
FileStore), so one code path serves a laptop and a cluster.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import errno
import fcntl
import hashlib
import json
import math
import os
import pickle
import random
import resource
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.distributed.checkpoint.metadata as dcp_metadata
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint import DefaultLoadPlanner, FileSystemReader
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_state_dict,
                                                     set_model_state_dict, set_state_dict)
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from tqdm import tqdm

from data.schema import file_digest, model_digest, refuse_to_replace

ROOT = Path(__file__).resolve().parent


@dataclass
class Distributed:
    rank: int
    world: int
    local_rank: int
    device: torch.device

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self):
        dist.barrier()

    def all_sum(self, value: float) -> float:
        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.item()

    store_dir: str | None = None  # the one-process group's FileStore directory, removed at close

    def close(self):
        if dist.is_initialized():
            dist.destroy_process_group()
        if self.store_dir:
            shutil.rmtree(self.store_dir, ignore_errors=True)


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """--help shows every option's default, so that the paper's values are seen where a user
    looks for them (the scripts' docstrings stay laid out as written)."""

    def _format_action(self, action):
        if action.help is None and self._shows_default(action):
            action = copy.copy(action)
            action.help = "(default: %(default)s)"  # argparse writes nothing for an option without help
        return super()._format_action(action)

    def _get_help_string(self, action):
        text = action.help or ""
        if self._shows_default(action) and "default" not in text:
            text += " (default: %(default)s)"
        return text

    @staticmethod
    def _shows_default(action) -> bool:
        return bool(action.option_strings) and action.default not in (None, False, [], argparse.SUPPRESS)


def add_trainer_args(p, *, unit: str, lr: float, batch_size: int, epochs: int, weight_decay: float,
                     warmup_ratio: float, grad_clip: float, max_len: int):
    """The flags of the trainers that learn from a data set (SFT, reward model), with that
    trainer's defaults (each script cites where its defaults come from). `unit` names what a
    batch counts: conversations, pairs."""
    p.add_argument("--val-data", nargs="+", help="validation files; default: a split of --data")
    p.add_argument("--epochs", type=int, default=epochs)
    p.add_argument("--warmup-ratio", type=float, default=warmup_ratio)
    p.add_argument("--max-len", type=int, help=f"tokens per sequence (default: {max_len}, or the model's context if shorter)")
    p.add_argument("--eval-every", type=int, default=0, help="steps between validations (0: once an epoch)")
    p.add_argument("--activation-checkpointing", action="store_true")
    p.add_argument("--log-every", type=int, default=10,
                   help="steps between progress lines when stderr is no terminal (a log, a pipe), which shows no "
                        "progress bar (0: none)")
    add_run_args(p, unit=unit, lr=lr, batch_size=batch_size, weight_decay=weight_decay, grad_clip=grad_clip,
                 max_steps=0, max_steps_help="stop after this many optimizer steps (0: epochs decide)",
                 save_every=100, save_every_help="steps between resumable states")


def add_run_args(p, *, unit: str, lr: float, batch_size: int, weight_decay: float, grad_clip: float,
                 max_steps: int, max_steps_help: str, save_every: int, save_every_help: str):
    """The flags every trainer shares, PPO's included: where the run goes and how it resumes,
    the optimizer step and how it is split among ranks and micro-batches."""
    p.add_argument("--out", type=Path, help="output directory")
    p.add_argument("--max-steps", type=int, default=max_steps, help=max_steps_help)
    p.add_argument("--batch-size", type=int, default=batch_size, help=f"global batch, in {unit}")
    p.add_argument("--micro-batch-size", type=int, default=1, help=f"{unit} per forward pass per rank")
    p.add_argument("--lr", type=float, default=lr)
    p.add_argument("--weight-decay", type=float, default=weight_decay)
    p.add_argument("--grad-clip", type=float, default=grad_clip)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--save-every", type=int, default=save_every, help=save_every_help)
    p.add_argument("--resume", action="store_true", help="continue from OUT/state (with the same settings and data)")
    p.add_argument("--allow-change", nargs="+", choices=sorted(CHANGEABLE), default=[],
                   help="with --resume: let these settings differ from the saved run's (the schedule follows "
                        "the new values from the step resumed)")
    p.add_argument("--overwrite", action="store_true",
                   help="start over in an --out that holds an earlier run (its metrics and state are discarded)")
    p.add_argument("--fp32", action="store_true", help="no bf16 mixed precision on GPU")
    p.add_argument("--grad-sync", choices=["every", "last"], default="every",
                   help="reduce-scatter gradients after every micro-batch (ZeRO's way: each rank holds only "
                        "its shard) or only after the last (fewer collectives, but a whole unsharded fp32 "
                        "gradient on every rank); see accumulate")


# What defines a run: a resume must have the same (check_setup). The micro-batch size, the
# number of ranks, --grad-sync and activation checkpointing change how a step is computed, not
# what it computes, and may differ. CHANGEABLE may differ when --allow-change names them.
DEFINING = ("epochs", "max_steps", "batch_size", "lr", "weight_decay", "warmup_ratio", "grad_clip", "max_len", "seed")
CHANGEABLE = {"lr": "lr", "max-steps": "max_steps", "epochs": "epochs"}


FLAT_STEPS = 3  # steps in a row with an exactly zero gradient before train_loop stops


def run_setup(args, defining: tuple[str, ...] = DEFINING, **extra) -> dict:
    """The settings (`defining`, names of args) and the data (by content: the files' digests,
    in no particular order) that define a training run, plus the trainer's own (`extra`: a base
    model, a loss margin; models by model_setup, files by digests)."""
    setup = {k: getattr(args, k) for k in defining}
    setup["data"] = sorted(file_digest(f) for f in args.data)
    setup["val_data"] = sorted(file_digest(f) for f in getattr(args, "val_data", None) or [])
    setup.update(extra)
    return json.loads(json.dumps(setup))


def check_setup(saved: dict, now: dict, allowed: list[str], where: Path):
    """Refuse to resume a run saved with other settings or data, naming each difference."""
    diff = [k for k in sorted(set(saved) | set(now)) if saved.get(k) != now.get(k)]
    refused = [k for k in diff if k not in {CHANGEABLE[a] for a in allowed}]
    if refused:
        changes = "; ".join(f"{k}: {saved.get(k)!r} -> {now.get(k)!r}" for k in refused)
        may = [a for a, k in CHANGEABLE.items() if k in refused]
        raise SystemExit(f"--resume: {where} was saved by a run with other settings or data ({changes}). Resume "
                         f"with the same ones, or start over with --overwrite" +
                         (f"; --allow-change {' '.join(may)} lets {'that' if len(may) == 1 else 'those'} change"
                          if may and len(may) == len(refused) else ""))


def model_setup(spec: str) -> str:
    """A base model by content (data.schema.model_digest), or the name of a built-in config."""
    return model_digest(spec) if Path(spec).is_dir() else spec


def run_distributed(train_fn, args):
    """train_fn(args, d) inside a process group, after the checks every trainer makes: the
    output directory is this run's alone (locked) and not an earlier run's unless --resume or
    --overwrite says what to do with it, and the global batch splits evenly into
    micro-batches x ranks."""
    d = init_distributed()
    lock = None
    try:
        if d.main:
            args.out.mkdir(parents=True, exist_ok=True)
            lock = lock_out(args.out)
            check_out(args.out, resume=args.resume, overwrite=args.overwrite)
        d.barrier()
        if args.batch_size % (args.micro_batch_size * d.world):
            raise SystemExit(f"--batch-size {args.batch_size} is not a multiple of --micro-batch-size "
                             f"{args.micro_batch_size} x {d.world} ranks")
        torch.manual_seed(args.seed)
        train_fn(args, d)
    finally:
        d.close()
        if lock is not None:
            lock.close()


def lock_out(out: Path):
    """An exclusive lock on OUT/.lock for as long as the returned file stays open: two runs
    writing one --out would interleave their metrics and overwrite each other's state."""
    f = open(out / ".lock", "a")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.close()
        raise SystemExit(f"{out}: another run is using this directory (it holds {out / '.lock'}); "
                         "wait for it, or choose another --out") from None
    return f


def check_out(out: Path, *, resume: bool, overwrite: bool):
    """Refuse to train into an earlier run's directory unless told how (data.schema's one rule);
    with --overwrite its metrics and resumable state go (best/ and final/ are replaced as the new
    run writes them)."""
    if resume or not refuse_to_replace(out, ["metrics.jsonl", "state", "best", "final"], overwrite=overwrite,
                                       what="run", resume=True):
        return
    (out / "metrics.jsonl").unlink(missing_ok=True)
    for name in ("state", "state.tmp", "state.old"):
        shutil.rmtree(out / name, ignore_errors=True)


def init_distributed() -> Distributed:
    """Join the process group torchrun set up, or make a one-process group of our own."""
    cuda = torch.cuda.is_available()
    backend = "nccl" if cuda else "gloo"
    if "RANK" in os.environ:
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        if cuda:
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend)
        store_dir = None
    else:
        local_rank = 0
        store_dir = tempfile.mkdtemp(prefix="huatuo-pg-")  # private to this process, removed at close
        store = dist.FileStore(os.path.join(store_dir, "store"), 1)
        dist.init_process_group(backend, store=store, rank=0, world_size=1)
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    return Distributed(dist.get_rank(), dist.get_world_size(), local_rank, device, store_dir)


def shard(model: torch.nn.Module, layers, *, bf16: bool, mesh=None):
    """FSDP2: each block is its own unit (gathered just before it runs, freed after), then the
    root takes what is left (embedding, final norm, head). On GPU, bf16 compute with fp32
    master weights and fp32 gradient reduction; on CPU everything stays fp32. Under bf16 the
    root hands its outputs back in fp32 (output_dtype): losses, log-probs and reward scores are
    read from them, and bf16 keeps only ~3 significant digits."""
    if bf16:
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        root = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32, output_dtype=torch.float32)
    else:
        mp = root = MixedPrecisionPolicy()  # outputs in the weights' own dtype
    for layer in layers:
        fully_shard(layer, mesh=mesh, mp_policy=mp)
    fully_shard(model, mesh=mesh, mp_policy=root)
    return model


@contextlib.contextmanager
def gathered(model: torch.nn.Module):
    """Inside, every FSDP unit of `model` stays gathered once a forward has gathered it: a
    rollout of N tokens then all-gathers each block once instead of N times. The price is the
    whole unsharded model (in the compute dtype: 26 GB for 13B in bf16) on every rank for as
    long as the block lasts; on leaving, each unit goes back to resharding after its forward
    (the root to FSDP's own default for it, keeping its few weights) and is resharded."""
    units = [m for m in model.modules() if isinstance(m, FSDPModule)]
    for unit in units:
        unit.set_reshard_after_forward(False, recurse=False)
    try:
        yield
    finally:
        for unit in units:
            unit.set_reshard_after_forward(unit is not model, recurse=False)
            unit.reshard()


def load_model(spec: str, out: Path, dist_info: Distributed, seed: int = 0):
    """An HF-format directory, or the name of a config in model.CONFIGS (`tiny`, the embedded
    default; randomly initialised, with the tokenizer trained on data/) -> (model on the meta
    device, read_weights, tokenizer). Nothing heavy happens here: read_weights() reads the full
    state dict on rank 0 (None elsewhere) when called, so a trainer checks its data first and
    never spends minutes reading 26 GB to fail on a bad --data line. Only rank 0 reads the
    weights; shard_and_load scatters them, so 8 ranks on one node do not hold 8 copies."""
    from model import CONFIGS, Transformer, load_config
    from tokenizer import Tokenizer

    config = load_config(spec)
    if spec in CONFIGS and not Path(spec).is_dir():
        tok = tiny_tokenizer(out, dist_info)

        def read_weights():
            return Transformer.from_config(config, seed=seed).state_dict() if dist_info.main else None
    else:
        tok = Tokenizer(Path(spec) / "tokenizer.model")

        def read_weights():
            return Transformer.from_pretrained(spec).state_dict() if dist_info.main else None
    tok.check_model_vocab(config.vocab_size, where=f"model {spec}")
    with torch.device("meta"):
        model = Transformer(config)
    return model, read_weights, tok


def shard_and_load(model, state_dict, dist_info: Distributed, *, bf16: bool):
    """Shard a meta-device model (one with .layers) with FSDP2, allocate each rank's shards on
    its device, and fill them from rank 0's full state dict."""
    shard(model, model.layers, bf16=bf16)
    model.to_empty(device=dist_info.device)
    return load_sharded(model, state_dict, dist_info)


def load_sharded(model, state_dict, dist_info: Distributed):
    """Fill a sharded model from rank 0's full state dict ({} or None elsewhere): each tensor
    is broadcast in turn and every rank keeps its shard of it."""
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
    set_model_state_dict(model, state_dict if dist_info.main else {}, options=options)
    return model


def eval_chunks(items: list, d: Distributed, micro: int):
    """This rank's share of `items` in micro-batches, as (chunk, real). Every rank yields the same
    number of chunks, because FSDP gathers weights collectively in each forward pass: a rank
    with nothing left gets a stand-in chunk (the first item) with real=False, to be ignored."""
    mine = items[d.rank::d.world]
    for b in range(math.ceil(math.ceil(len(items) / d.world) / micro)):
        chunk = mine[b * micro:(b + 1) * micro]
        yield (chunk, True) if chunk else (items[:1], False)


def cosine_lr(step: int, total: int, peak: float, warmup: int, floor: float = 0.0) -> float:
    """Learning rate of optimizer step `step` (1-based, 1..total): linear warmup to `peak` over
    the first `warmup` steps, then cosine decay from `peak` towards `floor`. The first step
    after warmup runs at the peak, and the cosine would reach the floor at step total + 1,
    which never runs: every step trains, and a 1-step run trains at the peak."""
    if step <= warmup:
        return peak * step / warmup
    progress = min(1.0, (step - warmup - 1) / max(1, total - warmup))
    return floor + (peak - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def make_optimizer(model: torch.nn.Module, lr: float, weight_decay: float, betas=(0.9, 0.999)):
    """AdamW with the official recipe's betas (HuatuoGPT scripts/finetune.py: torch's defaults,
    0.9 and 0.999). Weight decay on weight matrices and embeddings only, never on norm gains.
    (A deviation: the official script meant the same, excluding "bias" and "LayerNorm.weight",
    but no LLaMA tensor has those names, so there the RMSNorm gains are decayed towards 0 too.)"""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=False, foreach=True)  # foreach: the CPU too (GPUs default to it)


def accumulate(model, d: Distributed, global_batch: list, micro_batch: int, loss_sum, n_units: int, *,
               grad_clip: float, grad_sync: str = "every") -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of one global batch -> (loss, gradient norm before clipping), as 0-d tensors the
    caller reads once a step: nothing here waits for the device (a .item() per micro-batch
    would stall a GPU's queue each time, and lets plan.py run this on tensors without values).
    No update.

    This rank takes every world-th item of the global batch and runs it in micro-batches;
    loss_sum(items) returns the summed loss of its items (over tokens for SFT, over pairs for
    the reward model) and n_units counts those units in the whole global batch, on every rank.

    grad_sync "every" (the default) reduce-scatters each micro-batch's gradients as soon as its
    backward is done, so between micro-batches a rank holds only its shard of the gradient
    (4 bytes a parameter / ranks): what ZeRO, the paper's optimizer (App. E), does. "last"
    skips the collective until the last micro-batch; FSDP then keeps the whole unsharded
    gradient in fp32 on every rank (4 bytes a parameter: +49 GiB for Ziya-13B) in exchange
    for fewer collectives. plan.training_memory models both.
    """
    chunks = micro_batches(global_batch, d, micro_batch)
    total = torch.zeros((), dtype=torch.float64, device=d.device)
    for k, chunk in enumerate(chunks):
        model.set_requires_gradient_sync(grad_sync == "every" or k == len(chunks) - 1)
        s = loss_sum(chunk)
        # FSDP averages gradients over ranks; scaling by the world size turns that average into
        # a sum, so the gradient is that of (sum of unit losses) / (units in the global batch):
        # 1 rank and N ranks compute the same step.
        (s * d.world / n_units).backward()
        total += s.detach()
    dist.all_reduce(total)
    return total / n_units, grad_norm_and_clip(model, grad_clip)


def micro_batches(global_batch: list, d: Distributed, micro_batch: int) -> list[list]:
    """This rank's share of a global batch (every world-th item), cut into micro-batches."""
    mine = global_batch[d.rank::d.world]
    return [mine[i:i + micro_batch] for i in range(0, len(mine), micro_batch)]


def grad_norm_and_clip(model: torch.nn.Module, max_norm: float) -> torch.Tensor:
    """Clip the gradients to a total norm of max_norm; returns the norm before (a 0-d tensor)."""
    norm = torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.grad is not None], max_norm)
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm


def train_loop(args, d: Distributed, model, tok, *, name: str, sampler, loss_sum, n_units, n_tokens, validate,
               score, describe, setup: dict, flops_per_token: float | None = None):
    """The optimisation every trainer runs, written once. The trainer brings a sharded model,
    its batches and these functions:

        loss_sum(indices)  the summed loss (a tensor) of one micro-batch of training items
        n_units(indices)   what a global batch's loss is divided by (labelled tokens, pairs)
        n_tokens(indices)  tokens in a global batch, for tokens/s
        validate()         {metric: value} on the validation set over all ranks; {} if none
        score(metrics)     a tuple that orders validations, larger is better: best/ keeps the max
        describe(metrics)  one line of text for a validation
        setup              what defines the run (run_setup): saved with the state, and a
                           resume with another setup is refused

    The loop: AdamW, warmup + cosine schedule, a step per global batch (accumulate), a guard
    that stops before an update whose loss or gradient is not finite, validation at step 0,
    every --eval-every steps and at the end, best/ and final/ in the HF layout, state/ every
    --save-every steps (--resume continues exactly), one JSON line a step in metrics.jsonl.
    """
    out = args.out
    steps_per_epoch = len(sampler)
    total = args.epochs * steps_per_epoch
    total = min(total, args.max_steps) if args.max_steps else total
    warmup = round(args.warmup_ratio * total)
    eval_every = args.eval_every or steps_per_epoch
    opt = make_optimizer(model, args.lr, args.weight_decay)
    state = TrainState(out, d)
    metrics = MetricsLog(out / "metrics.jsonl", d.main)
    if d.main:  # model-sized leftovers of a save that was killed or ran out of disk
        for leftover in [*out.glob(".best.tmp-*"), *out.glob(".best.old-*"), *out.glob(".final.tmp-*"),
                         *out.glob(".final.old-*")]:
            shutil.rmtree(leftover, ignore_errors=True)
        state.recover()
    d.barrier()
    step, best, saved = 0, None, None
    flat = 0  # optimizer steps in a row whose gradient was exactly zero
    trainer = state.resume(args, setup, model, opt)
    if trainer:
        step, best, saved = trainer["step"], trainer["best"], trainer["step"]
        sampler.load_state_dict(trainer["sampler"])
        metrics.truncate_after(step)

    def last_state() -> str:  # what the guards below name: only a state that exists
        return f"{state.dir} (step {saved})" if saved is not None else "none, no state was saved yet"

    def rounded(m: dict) -> dict:
        return {k: round(v, 6) for k, v in m.items()}

    if step == 0:  # where validation starts from
        v = validate()
        if v:
            metrics.write(step=0, **rounded(v), best=False)
    peak_tflops = getattr(args, "peak_tflops", None)
    batches, timer = iter(sampler), Timer()
    bar = tqdm(total=total, initial=step, disable=not d.main, desc=name)
    # A log file or a pipe shows no progress bar: there, a line every --log-every steps instead.
    log_every = args.log_every if d.main and not sys.stderr.isatty() else 0
    started, first = time.monotonic(), step
    while step < total:
        global_batch = next(batches)
        lr = cosine_lr(step + 1, total, args.lr, warmup)
        loss, grad_norm = map(float, accumulate(model, d, global_batch, args.micro_batch_size, loss_sum,
                                                n_units(global_batch), grad_clip=args.grad_clip,
                                                grad_sync=args.grad_sync))
        if not (math.isfinite(loss) and math.isfinite(grad_norm)):
            raise SystemExit(f"step {step + 1}: loss {loss} / gradient norm {grad_norm} is not finite; stopping "
                             f"before the update. The last good state: {last_state()}. Lower --lr or check the data.")
        # An exactly zero gradient (in fp32, over every trainable weight) does not happen to a
        # model that is learning; it does to one whose activations blew up and saturated.
        flat = flat + 1 if grad_norm == 0.0 else 0
        if flat >= FLAT_STEPS:
            raise SystemExit(f"steps {step + 2 - flat}-{step + 1}: the gradient is exactly zero (loss flat at "
                             f"{loss:.6g}): the model has stopped learning, most likely blown up by too high an "
                             f"--lr. Stopping; best/ holds no validation from those steps. "
                             f"The last state: {last_state()}.")
        for group in opt.param_groups:
            group["lr"] = lr
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        dt = timer.lap()
        seen = n_tokens(global_batch)
        record = dict(step=step, epoch=round(step / steps_per_epoch, 3), loss=round(loss, 6), lr=lr,
                      grad_norm=round(grad_norm, 6), tokens_per_s=round(seen / dt, 1),
                      peak_mem_gb=round(peak_memory_gb(d.device), 3))
        if flops_per_token and peak_tflops and d.device.type == "cuda":
            record["mfu"] = round(seen / dt * flops_per_token / (peak_tflops * 1e12 * d.world), 4)
        metrics.write(**record)
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.2e}")
        if log_every and step % log_every == 0:
            spent = time.monotonic() - started
            tqdm.write(f"step {step}/{total}: loss {loss:.4f}, lr {lr:.2e}, {spent:.0f} s so far, about "
                       f"{spent / (step - first) * (total - step):.0f} s to go", file=sys.stdout)
        if step % eval_every == 0 or step == total:
            v = validate()
            if v:
                sound = flat == 0 and all(math.isfinite(x) for x in v.values())  # never keep a broken model
                improved = sound and (best is None or score(v) > score(best))
                metrics.write(step=step, **rounded(v), best=improved)
                if d.main:
                    tqdm.write(f"step {step}: {describe(v)}" + (" (best: saving best/)" if improved else ""))
                if improved:
                    best = v
                    save_hf(model, out / "best", tok.path, d)
        if step % args.save_every == 0 or step == total:
            state.save(model, opt, {"step": step, "best": best, "sampler": sampler.state_dict(), "setup": setup})
            saved = step
        timer.lap()  # validation and checkpoints do not count against tokens/s
    bar.close()
    save_hf(model, out / "final", tok.path, d)
    if d.main:
        kept = f"best {describe(best)} in {out / 'best'}; " if best else ""
        print(f"done: {step} steps; {kept}final weights in {out / 'final'}")
    return best


# -- checkpoints ---------------------------------------------------------------------------------


def _atomic_dir_swap(tmp: Path, final: Path):
    """Replace `final` by the finished directory `tmp`; the old one is removed only afterwards.
    A kill between the two renames leaves final.old and tmp, both complete: TrainState.recover
    takes the newer."""
    if final.exists():
        old = final.with_name(final.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        os.rename(final, old)
        os.rename(tmp, final)
        shutil.rmtree(old)
    else:
        os.rename(tmp, final)


# What a torch.distributed.checkpoint .metadata file is made of. It is a pickle, and a pickle
# can name any function to call: loading a crafted state directory with pickle.load would run
# its code. Only these classes and functions may be named.
_METADATA_GLOBALS = {("torch.distributed.checkpoint.filesystem", "_StorageInfo"), ("torch", "Size"),
                     ("torch.serialization", "_get_layout"), ("pathlib", "PosixPath"), ("pathlib", "PurePosixPath"),
                     ("collections", "OrderedDict")}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        allowed = (module, name) in _METADATA_GLOBALS
        if module == "torch.distributed.checkpoint.metadata":  # its dataclasses and enums
            obj = getattr(dcp_metadata, name, None)
            allowed = isinstance(obj, type) and obj.__module__ == module
        elif module == "torch":
            allowed = allowed or isinstance(getattr(torch, name, None), torch.dtype)
        if not allowed:
            raise pickle.UnpicklingError(f"it names {module}.{name}, which a checkpoint's metadata never holds")
        return super().find_class(module, name)


class _SafeReader(FileSystemReader):
    """FileSystemReader whose .metadata goes through the allow-listed unpickler above."""

    def read_metadata(self, *args, **kwargs):
        with self.fs.create_stream(self._get_metadata_path(kwargs.get("rank")), "rb") as f:
            metadata = _MetadataUnpickler(f).load()
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = dcp_metadata.StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class _SafePlanner(DefaultLoadPlanner):
    """The default planner reads non-tensor entries (the optimizer's hyperparameters) with
    torch.load(weights_only=False); plain numbers, strings and lists need no more than
    weights_only=True, which runs no code."""

    def load_bytes(self, read_item, value):
        obj = torch.load(value, weights_only=True)
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
        else:
            self.state_dict[read_item.dest_index.fqn] = obj


class TrainState:
    """The resumable training state in OUT/state/: weights and optimizer through
    torch.distributed.checkpoint (each rank writes its own shards; a run can resume on another
    number of ranks), and trainer.json with the step, sampler position, best validation score
    and the RNG states of every rank. Written to OUT/state.tmp (trainer.json last) and renamed
    when complete, so OUT/state is always the last checkpoint that finished. Loading never
    unpickles anything but checkpoint metadata and plain values (_SafeReader, _SafePlanner)."""

    def __init__(self, out: Path, dist_info: Distributed):
        self.dir, self.tmp, self.d = out / "state", out / "state.tmp", dist_info
        self.old = out / "state.old"

    def exists(self) -> bool:
        return (self.dir / "trainer.json").is_file()

    def recover(self):
        """After a kill between save's two renames there is no state/ but a complete state.tmp
        (newer) and state.old: put the newest complete one in place. Incomplete leftovers (a
        kill while writing, a full disk) are removed. Rank 0 only; call before exists()."""
        if not self.d.main:
            return
        if not self.exists():
            for candidate in (self.tmp, self.old):
                if (candidate / "trainer.json").is_file():
                    shutil.rmtree(self.dir, ignore_errors=True)
                    os.rename(candidate, self.dir)
                    print(f"recovered the state of an interrupted save: {candidate} -> {self.dir}")
                    break
        for leftover in (self.tmp, self.old):
            shutil.rmtree(leftover, ignore_errors=True)

    def save(self, model, optimizer, trainer: dict):
        if self.d.main:
            shutil.rmtree(self.tmp, ignore_errors=True)
            self.tmp.mkdir(parents=True)
        self.d.barrier()
        msd, osd = get_state_dict(model, optimizer)
        with writing(self.tmp):
            dcp.save({"model": msd, "optim": osd}, checkpoint_id=str(self.tmp))
        self.d.barrier()
        files = self._digests(self.tmp)  # what was written, to be checked when it is read
        rng = _rng_state()
        gathered = [None] * self.d.world
        dist.all_gather_object(gathered, rng)
        if self.d.main:
            content = dict(trainer, rng=gathered, files=files)
            with writing(self.tmp):
                (self.tmp / "trainer.json").write_text(json.dumps(dict(content, digest=_json_digest(content))),
                                                       encoding="utf-8")
            _atomic_dir_swap(self.tmp, self.dir)
        self.d.barrier()

    def _digests(self, directory: Path, only: set[str] | None = None) -> dict[str, str]:
        """sha256 digests of the state's files, each rank hashing its share (every world-th file):
        a 13B state is 146 GiB, and 8 ranks read it 8 times faster than one."""
        names = sorted(f.name for f in directory.iterdir() if f.name != "trainer.json" and (only is None or f.name in only))
        mine = {name: file_digest(directory / name) for name in names[self.d.rank::self.d.world]}
        everyone = [None] * self.d.world
        dist.all_gather_object(everyone, mine)  # names and digests: a few bytes a file
        return {k: v for part in everyone for k, v in part.items()}

    def trainer(self) -> dict:
        """The trainer's part of the state (step, sampler, best, setup, the files' digests),
        without the weights; refused, naming the file, when it is not what was written."""
        path = self.dir / "trainer.json"
        try:
            content = json.loads(path.read_text(encoding="utf-8"))
            digest = content.pop("digest", None)
        except (ValueError, UnicodeDecodeError, AttributeError) as e:
            raise SystemExit(f"{path}: not a state this project wrote, or a damaged one ({e}); nothing was "
                             "loaded: start over with --overwrite, or restore the file") from None
        if digest is not None and digest != _json_digest(content):
            raise SystemExit(f"{path}: its contents are not what was saved (they do not match the digest written "
                             "with them): changed or damaged since; nothing was loaded: start over with --overwrite, "
                             "or restore the file")
        return content

    def resume(self, args, setup: dict, model, optimizer) -> dict | None:
        """With --resume and a state here: refuse another setup (check_setup), else load the
        weights and optimizer and return the trainer's part (it says "step"). None otherwise."""
        if not args.resume:
            return None
        if not self.exists():
            if self.d.main:
                print(f"--resume: no state in {self.dir.parent}, starting from the beginning")
            return None
        check_setup(self.trainer().get("setup", {}), setup, args.allow_change, self.dir)
        trainer = self.load(model, optimizer)
        if self.d.main:
            print(f"resumed from {self.dir} at step {trainer['step']}")
        return trainer

    def load(self, model, optimizer) -> dict:
        trainer = self.trainer()
        msd, osd = get_state_dict(model, optimizer)
        state = {"model": msd, "optim": osd}
        reader = _SafeReader(str(self.dir))
        try:
            reader.read_metadata()  # checked here first, for a clear message before DCP's machinery
        except pickle.UnpicklingError as e:
            raise SystemExit(f"{self.dir}: refusing to load this state: {e}. Nothing was loaded or run; "
                             "it is not a state this project wrote.") from None
        saved = trainer.pop("files", None)
        if saved is not None:  # (states of earlier versions carry no digests and are not checked)
            on_disk = {f.name for f in self.dir.iterdir() if f.name != "trainer.json"}
            now = self._digests(self.dir, only=set(saved) & on_disk)
            wrong = sorted(set(saved) - on_disk) + sorted(n for n in now if now[n] != saved[n])
            if wrong:
                raise SystemExit(f"{self.dir / wrong[0]}: not the file that was saved ("
                                 f"{'missing' if wrong[0] not in on_disk else 'its digest differs'}"
                                 f"{f'; {len(wrong) - 1} more' if len(wrong) > 1 else ''}): the state was changed "
                                 "or damaged since; nothing was loaded: start over with --overwrite, or restore it")
        dcp.load(state, storage_reader=reader, planner=_SafePlanner())
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
        rngs = trainer.pop("rng")
        if len(rngs) == self.d.world:  # same number of ranks: each takes up its own RNG streams
            _set_rng_state(rngs[self.d.rank])
        return trainer


def _json_digest(content: dict) -> str:
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()[:16]


def _rng_state() -> dict:
    state = {"python": random.getstate(), "torch": torch.get_rng_state().tolist()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state().tolist()
    return json.loads(json.dumps(state))


def _set_rng_state(state: dict):
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(torch.tensor(state["cuda"], dtype=torch.uint8))


def full_state_dict(model) -> dict:
    """The whole (unsharded) state dict on rank 0's CPU; other ranks get an empty dict."""
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def save_hf(model, path: Path, tokenizer, dist_info: Distributed):
    """Write the model with its save_pretrained (rank 0), atomically; all ranks take part."""
    sd = full_state_dict(model)
    if dist_info.main:
        with writing(path):
            model.save_pretrained(path, tokenizer=tokenizer, state_dict=sd)
    dist_info.barrier()


@contextlib.contextmanager
def writing(path: Path):
    """Writes to `path` whose failure for want of space, or of permission, is said as such and
    names the path: torch's writers report a full disk as "[enforce fail at inline_container.cc]
    unexpected pos", and torch.distributed.checkpoint wraps that again (a BaseException)."""
    try:
        yield
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES) and not e.filename:
            raise OSError(e.errno, e.strerror, str(path)) from None
        raise
    except (RuntimeError, CheckpointException):
        if _free_bytes(path) < 64 << 20:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path)) from None
        raise


def _free_bytes(path: Path) -> int:
    for p in (path, *path.parents):
        if p.exists():
            return shutil.disk_usage(p).free
    return 1 << 62


# -- observability -------------------------------------------------------------------------------


class MetricsLog:
    """Append-only JSONL of training records, written by rank 0 only."""

    def __init__(self, path: Path, enabled: bool):
        self.path, self.enabled = path, enabled

    def truncate_after(self, step: int):
        """On resume: drop records of steps after the checkpoint; they will be made again."""
        if self.enabled and self.path.is_file():
            lines = [l for l in self.path.read_text(encoding="utf-8").splitlines() if l.strip()]
            records = []
            for n, line in enumerate(lines, start=1):
                try:
                    records.append((line, json.loads(line)))
                except json.JSONDecodeError:
                    if n < len(lines):  # only the last line can be cut short by a kill
                        raise SystemExit(f"{self.path}:{n}: not valid JSON, and not the last line; "
                                         "this file was not written by an interrupted run alone") from None
            kept = [l for l, r in records if r.get("step", 0) <= step]
            tmp = self.path.with_name(self.path.name + ".tmp")
            tmp.write_text("".join(l + "\n" for l in kept), encoding="utf-8")
            os.replace(tmp, self.path)

    def write(self, **record):
        if self.enabled:
            with writing(self.path), open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(record, ensure_ascii=False) + "\n")


def peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


class Timer:
    def __init__(self):
        self.t = time.perf_counter()

    def lap(self) -> float:
        now = time.perf_counter()
        dt, self.t = now - self.t, now
        return dt


def tiny_tokenizer(out: Path, dist_info: Distributed, vocab_size: int = 2048):
    """The embedded default's tokenizer: trained on the text shipped in data/ (deterministic),
    by rank 0, into OUT/tokenizer.model."""
    from tokenizer import Tokenizer, corpus_sentences, train_tokenizer

    path = out / "tokenizer.model"
    if dist_info.main and not path.is_file():
        files = sorted(str(f) for f in (ROOT / "data").glob("*/*.jsonl"))
        train_tokenizer(corpus_sentences(files), path, vocab_size=vocab_size)
    dist_info.barrier()
    return Tokenizer(path)
