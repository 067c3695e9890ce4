"""Distributed plumbing, apart from training: the process group, the device mesh, FSDP2's
wrapping and gathering, the collectives every rank must reach, the work rank 0 does alone,
preemption, timeouts and the --out checks. The trainers, and training.py's run lifecycle,
stand on these; nothing here knows what a loss or an optimizer step is.

    Distributed, init_distributed   the process group (gloo on CPU, nccl on GPU): rank, world, device
    run_distributed   a trainer's main inside a process group, its --out locked and checked (safety.py)
    exit_trainer      a trainer's command line: its exit status, a dead or stuck rank named in one line
    Preemption        a stop signal turned into a stop at the next step, on every rank at once
    check_shared, on_rank_0         --out shared by every rank; rank 0's solo work, its failure shared
    device_mesh, shard, gathered    FSDP2 on each block and the root; every unit kept gathered for a rollout
    shard_and_load, load_sharded    a meta-device model sharded and filled from rank 0, a file at a time
    all_finite, full_state_dict     one answer for every rank; the full weights gathered for an export
    Distributed.all_sum, .all_gather_list   a number summed, a list of small objects joined, over the ranks

FSDP2 stands in for the paper's ZeRO (App. E: ZeRO on 8 A100s): parameters, gradients and
optimizer states are sharded across ranks, and each block's weights are gathered only while it
runs. A run always has a process group, a single process too (world size 1, through a
FileStore), so one code path serves a laptop and a cluster.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import shutil
import signal
import sys
import tempfile
import traceback
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

from lora import LoRALinear
from safety import check_out, lock_out, run_main


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

    def all_gather_list(self, items: list) -> list:
        """Every rank's list of Python objects, concatenated in rank order, on every rank. For a
        few bytes an item (token ids, names): no tensor goes through an object collective."""
        if self.world == 1:
            return items
        parts = [None] * self.world
        dist.all_gather_object(parts, items)
        return [x for part in parts for x in part]

    store_dir: str | None = None  # the one-process group's FileStore directory, removed at close

    def close(self):
        if dist.is_initialized():
            dist.destroy_process_group()
        if self.store_dir:
            shutil.rmtree(self.store_dir, ignore_errors=True)


# What a cluster sends before it kills a job: SIGTERM (SLURM's default, and what torchrun's agent
# passes on to its workers, killing them 30 s later), or one chosen ahead of time
# (`sbatch --signal=USR1@120`: SIGUSR1 120 s before the end).
SIGNALS = {"TERM": signal.SIGTERM, "USR1": signal.SIGUSR1, "USR2": signal.SIGUSR2, "INT": signal.SIGINT}
STOP_SIGNALS = ("TERM", "USR1")
PREEMPTED_EXIT = 75  # sysexits.h's EX_TEMPFAIL, "try again later": the state is saved, rerun to resume
PREEMPTED = "preempted"  # OUT/preempted: the step a stopped run saved, read by the rerun
# torch's own default for a gloo group (NCCL's is 10 min); here the same on both. Rank 0's
# longest solo phase at 13B, the 26 GB HF export at 1 GB/s, takes under a minute (docs/scale.md).
DIST_TIMEOUT_S = 1800.0
SHARED = ".shared-by-ranks"  # OUT/.shared-by-ranks: rank 0's token, which every rank must read back


class Preemption:
    """A run that a signal stops at its next step, on every rank. The handler only notes the
    signal; a trainer asks requested() at each step boundary, which all-reduces the notes (one
    int, MAX), so that one rank's signal stops every rank at the same step; a flag read by each
    rank alone would leave some in the next step's collectives while others save, and hang
    (or save nothing). The trainer saves its state as a normal save does, then stop() writes
    OUT/preempted (after the state, so it never names a state that is not complete) and exits
    with PREEMPTED_EXIT. Rerun with the same command, or under torchrun's --max-restarts, and
    run_distributed reads the marker as --resume."""

    def __init__(self, names):
        self.signal = None
        self.previous = {}
        for name in names:
            self.previous[SIGNALS[name]] = signal.signal(SIGNALS[name], self._note)

    def _note(self, signum, _frame):
        self.signal = signum

    def requested(self, d: Distributed) -> bool:
        flag = torch.tensor([0 if self.signal is None else 1], dtype=torch.int32, device=d.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def stop(self, d: Distributed, out: Path, where: str):
        """After the state is saved: the marker, one line, the exit status, on every rank."""
        if d.main:
            (out / f"{PREEMPTED}.tmp").write_text(where + "\n", encoding="utf-8")
            os.replace(out / f"{PREEMPTED}.tmp", out / PREEMPTED)
            why = signal.Signals(self.signal).name if self.signal else "another rank's signal"
            print(
                f"stopped by {why} after {where}: the state is in {out / 'state'}; the same command resumes it",
                flush=True,
            )
        d.barrier()
        raise SystemExit(PREEMPTED_EXIT)

    def close(self):
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)


def run_distributed(train_fn, args):
    """train_fn(args, d) inside a process group, after the checks every trainer makes: the
    output directory is this run's alone (locked) and not an earlier run's unless --resume or
    --overwrite says what to do with it, and the global batch splits evenly into
    micro-batches x ranks."""
    preemption = Preemption(args.stop_signals)
    d = init_distributed(args.dist_timeout)
    lock = None
    try:
        if d.main:
            args.out.mkdir(parents=True, exist_ok=True)
            lock = lock_out(args.out)
        resumes = torch.tensor(
            [int(d.main and (args.out / PREEMPTED).is_file() and not args.overwrite)], device=d.device
        )
        dist.broadcast(resumes, 0)  # rank 0 read the disk; every rank takes its answer
        if int(resumes) and not args.resume:  # a rerun of a preempted run: it resumes
            args.resume = True
            if d.main:
                where = (args.out / PREEMPTED).read_text(encoding="utf-8").strip()
                print(f"{args.out} holds a run stopped after {where}: resuming it (--overwrite starts over)")
        if d.main:
            check_out(args.out, resume=args.resume, overwrite=args.overwrite)
            (args.out / PREEMPTED).unlink(missing_ok=True)
        d.barrier()
        check_shared(args.out, d)
        check_shard_ranks(d.world, args.shard_ranks)  # before the data and the model load
        check_split(args, d.world)
        torch.manual_seed(args.seed)
        args.preemption = preemption
        train_fn(args, d)
        d.barrier()  # every rank done with every collective before any tears its group down
    finally:
        preemption.close()
        d.close()
        if lock is not None:
            lock.close()


def exit_trainer(main) -> None:
    """A trainer's command line: safety.run_main(main), then the process ends with its status
    through os._exit, without the interpreter's teardown. FSDP's DTensor caches keep the gloo
    group alive past destroy_process_group, so its worker threads still run while the
    interpreter tears itself down, and one of them that takes the GIL then dies inside C++
    ("terminate called without an active exception", SIGABRT), failing a finished run about
    once in a hundred 2-rank runs on a loaded machine. Nothing is left to write by then: every
    file the trainers write is closed. A collective that fails because another rank died or hung
    (a RuntimeError from gloo or NCCL) ends as one line naming the rank and --dist-timeout."""
    try:
        code = run_main(main)
    except SystemExit as e:  # PREEMPTED_EXIT, argparse's 2 (run_main has printed a message's)
        code = e.code or 0 if isinstance(e.code, (int, type(None))) else 1
    except BaseException as e:  # a bug: its traceback, as Python gives it; a dead or stuck peer: one line
        if isinstance(e, RuntimeError) and collective_failed(e):
            rank = dist.get_rank() if dist.is_initialized() else os.environ.get("RANK", 0)
            print(
                f"error: rank {rank}: a collective failed, {str(e).splitlines()[0].strip()}: another rank died, or "
                f"stopped for longer than --dist-timeout; rerun with --resume (the state is the last one saved)",
                file=sys.stderr,
            )
        else:
            traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def collective_failed(e: RuntimeError) -> bool:
    """An error that a peer's death or hang gives a collective (gloo's transport, a timeout,
    NCCL's), not a bug in the caller."""
    return isinstance(e, dist.DistError) or any(
        s in str(e)
        for s in (
            "gloo/transport",
            "Connection closed by peer",
            "Connection reset by peer",
            "Timed out waiting",
            "NCCL",
        )
    )


def check_shared(out: Path, d: Distributed, flag: str = "--out"):
    """--out must be one directory on every rank: each rank writes its shard of the state there
    and rank 0 the rest, so a path that is each node's local disk would leave a state no node
    can resume (train_sft.py's --data-cache likewise: rank 0 renders into it, every rank maps
    it). Rank 0 writes a random token; after a barrier every rank reads it back; one all-reduce
    tells every rank which ranks did not, and all of them stop, before any work."""
    token = torch.tensor(int.from_bytes(os.urandom(7), "big") if d.main else 0, dtype=torch.int64, device=d.device)
    dist.broadcast(token, 0)
    if d.main:
        (out / SHARED).write_text(str(int(token)), encoding="utf-8")
    d.barrier()
    try:
        seen = (out / SHARED).read_text(encoding="utf-8") == str(int(token))
    except OSError:
        seen = False
    missing = torch.zeros(d.world, dtype=torch.int32, device=d.device)
    missing[d.rank] = int(not seen)
    dist.all_reduce(missing)  # also the barrier before rank 0 removes the token
    if d.main:
        (out / SHARED).unlink()
    if missing.any():
        ranks = ", ".join(str(r) for r in missing.nonzero().flatten().tolist())
        raise SystemExit(
            f"{flag} {out} is not the same directory on every rank: rank(s) {ranks} do not see what rank "
            f"0 wrote there. Give a path on a filesystem every node shares"
        )


def on_rank_0(work, d: Distributed, what: str):
    """work() on rank 0 alone while the other ranks wait; one broadcast then tells every rank
    whether it failed, so that all of them stop at once (rank 0 with its own error, the others
    with one line) rather than the others waiting out --dist-timeout."""
    failure = None
    if d.main:
        try:
            work()
        except BaseException as e:  # a bad data line (SystemExit), a full disk, a stop signal
            failure = e
    failed = torch.tensor(int(failure is not None), device=d.device)
    dist.broadcast(failed, 0)
    if failure is not None:
        raise failure
    if int(failed):
        raise SystemExit(f"rank 0 could not {what} (its error says why)")


def init_distributed(timeout_s: float = DIST_TIMEOUT_S) -> Distributed:
    """Join the process group torchrun set up, or make a one-process group of our own. A
    collective that waits longer than timeout_s for another rank raises (gloo), or is aborted
    by NCCL's watchdog: a rank that died or hangs ends the run (exit_trainer says so)."""
    cuda = torch.cuda.is_available()
    backend = "nccl" if cuda else "gloo"
    timeout = datetime.timedelta(seconds=timeout_s)
    if "RANK" in os.environ:
        local_rank = int(os.environ.get("LOCAL_RANK", 0))  # this node's GPU; everything else uses the global rank
        if cuda:
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend, timeout=timeout)
        store_dir = None
    else:
        local_rank = 0
        store_dir = tempfile.mkdtemp(prefix="huatuo-pg-")  # private to this process, removed at close
        store = dist.FileStore(os.path.join(store_dir, "store"), 1)
        dist.init_process_group(backend, store=store, rank=0, world_size=1, timeout=timeout)
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    return Distributed(dist.get_rank(), dist.get_world_size(), local_rank, device, store_dir)


def device_mesh(device_type: str, world: int, shard_ranks: int | None = None):
    """The ranks a model is sharded over (distributed.shard's mesh). shard_ranks None or `world`:
    all of them, FSDP (ZeRO-3). Fewer (--shard-ranks, one node's GPUs): HSDP, a 2-D mesh whose
    rows are groups of shard_ranks consecutive ranks; each group holds one sharded copy, and
    the copies are kept equal by an all-reduce of the gradient shards across groups. On 8 nodes
    of 8 that keeps FSDP's all-gathers inside a node (NVLink) and sends across nodes only 1/8
    of the gradient (plan.Network), for 8x the per-rank weights and Adam state."""
    from torch.distributed.device_mesh import init_device_mesh

    check_shard_ranks(world, shard_ranks)
    if shard_ranks in (None, world):
        return init_device_mesh(device_type, (world,))
    return init_device_mesh(device_type, (world // shard_ranks, shard_ranks), mesh_dim_names=("replicate", "shard"))


def check_split(args, world: int):
    """The global batch must split evenly into micro-batches x ranks, and PPO's rollout into
    global batches; the dry run refuses what the run would (plan.py calls this with
    --world-size)."""
    rollout = getattr(args, "rollout_size", None)
    if rollout is not None and rollout % args.batch_size:
        raise SystemExit(f"--rollout-size {rollout} must be a multiple of --batch-size {args.batch_size}")
    if args.batch_size % (args.micro_batch_size * world):
        raise SystemExit(
            f"--batch-size {args.batch_size} is not a multiple of --micro-batch-size "
            f"{args.micro_batch_size} x {world} ranks"
        )


def check_shard_ranks(world: int, shard_ranks: int | None):
    """--shard-ranks must divide the ranks (every rank decides alike: nothing is read)."""
    if shard_ranks is not None and (shard_ranks < 1 or world % shard_ranks):
        raise SystemExit(f"--shard-ranks {shard_ranks} does not divide the {world} ranks")


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


def mixed_precision(d: Distributed, args) -> bool:
    """bf16 compute with fp32 master weights: on a GPU unless --fp32; on a CPU never."""
    return d.device.type == "cuda" and not args.fp32


def frozen_in_bf16(model: torch.nn.Module):
    """Every parameter that does not train, stored in bf16 (on the meta device: only the dtype
    changes, before sharding allocates it); see shard_and_load."""
    for p in model.parameters():
        if not p.requires_grad:
            p.data = p.data.to(torch.bfloat16)


def shard_and_load(model, state_dict, d: Distributed, *, bf16: bool, frozen_bf16: bool = False, mesh=None):
    """Shard a meta-device model (one with .layers) with FSDP2, allocate each rank's shards on
    its device, and fill them from rank 0's weights (load_sharded: a state dict or its groups).

    frozen_bf16 (LoRA runs, under bf16): the weights that do not train are stored in bf16, not
    fp32. FSDP gathers every weight in bf16 for the compute anyway, so each step is the same to
    the bit; a frozen weight has no gradient and no optimizer state, so nothing needs its fp32
    copy, and a frozen 13B base takes 26 GB in place of 52 (it is exported in bf16 too, merged
    with its adapters in fp32)."""
    if bf16 and frozen_bf16:
        frozen_in_bf16(model)
    shard(model, model.layers, bf16=bf16, mesh=mesh)
    model.to_empty(device=d.device)
    return load_sharded(model, state_dict, d)


def load_sharded(model, weights, d: Distributed):
    """Fill a sharded model from rank 0's weights (None elsewhere): a full state dict, or
    groups of it (an iterable of dicts, read_weights' files), each scattered before the next is
    drawn. Every tensor is broadcast in turn and every rank keeps its shard of it; rank 0 says
    when the groups end, and which of the model's tensors none of them held (every rank then
    stops, before a step runs on uninitialised memory)."""
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, strict=False)
    groups = iter([weights] if isinstance(weights, dict) else weights) if d.main else None
    loaded = set()
    while True:
        failure = None
        try:
            group = next(groups, None) if d.main else None
        except Exception as e:  # a bad shard file: every rank stops, not only the one reading it
            group, failure = None, e
        more = torch.tensor(-1 if failure else int(group is not None), device=d.device)
        dist.broadcast(more, 0)
        if int(more) < 0:
            if failure is not None:
                raise failure
            raise SystemExit("rank 0 could not read the weights (its error says why)")
        if not more:
            break
        loaded.update(group or ())
        set_model_state_dict(model, group if d.main else {}, options=options)
        del group
    missing = sorted(set(model.state_dict()) - loaded) if d.main else []
    count = torch.tensor(len(missing), device=d.device)
    dist.broadcast(count, 0)
    if int(count):
        raise SystemExit(
            f"the weights given lack {int(count)} of the model's tensors"
            + (f": {', '.join(missing[:5])}" if missing else " (rank 0 names them)")
        )
    return model


def all_finite(model: torch.nn.Module, d: Distributed, optimizer: torch.optim.Optimizer | None = None) -> bool:
    """Whether every weight, and with `optimizer` every tensor of its state (Adam's moments),
    is finite on every rank: each rank checks its own shards, one all-reduce tells them all. A
    state or an export is written only when this holds (Run.save, save_hf, train_ppo.py)."""
    local = [p for p in model.parameters()]
    if optimizer is not None:
        local += [v for state in optimizer.state.values() for v in state.values() if torch.is_tensor(v)]
    local = [t.to_local() if isinstance(t, DTensor) else t for t in local]
    checks = [torch.isfinite(t).all() for t in local if t.is_floating_point() and t.numel()]
    finite = bool(torch.stack(checks).all()) if checks else True
    return d.all_sum(0.0 if finite else 1.0) == 0


def full_state_dict(model, dtype: torch.dtype | None = None) -> dict:
    """The whole (unsharded) state dict on rank 0's CPU, other ranks an empty dict, gathered
    tensor by tensor (every rank takes part in each all-gather) and each cast to `dtype` as it
    arrives: rank 0 holds the model in that dtype (24.4 GiB at 13B in bf16), never all of it in
    fp32. A LoRA layer's weight and adapters stay as they are, for pretrained.save_model to merge
    in fp32 before it casts."""
    keep = {
        f"{name}.{part}"
        for name, mod in model.named_modules()
        if isinstance(mod, LoRALinear)
        for part in ("weight", "lora_a", "lora_b")
    }
    main = not dist.is_initialized() or dist.get_rank() == 0
    out = {}
    for name, t in model.state_dict().items():
        whole = t.full_tensor() if isinstance(t, DTensor) else t
        if main:
            out[name] = whole.to("cpu", dtype=None if dtype is None or name in keep else dtype)
        del whole
    return out
