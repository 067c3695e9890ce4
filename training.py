"""The run lifecycle the three trainers (SFT, reward model, PPO) share, apart from the
distributed plumbing (distributed.py). Each trainer writes its own loop, step by step, and calls
these; none of them calls a trainer.

    add_run_args, add_trainer_args  the flags the trainers share, with each trainer's defaults
    load_model        a model on the meta device, its weights read file by file on rank 0
    rendered_once     the data cache entry of a run's data, rendered once by rank 0
    micro_batches, eval_chunks      a rank's share of a batch, in micro-batches
    cosine_lr, set_lr, update, make_optimizer, grad_norm_and_clip   the schedule, AdamW, clipping
    TrainState        the resumable state (torch.distributed.checkpoint), written atomically
    Run, Schedule     a run's resume, saves, preemption and step guard; a supervised run's steps
    save_hf           the full weights gathered to rank 0 and written in the HF layout
    MetricsLog, Progress, Timer, peak_memory_gb   what a run shows and records
    tiny_tokenizer    the embedded default's tokenizer, trained on data/

What protects a run (the --out lock, fingerprints, safe loading, atomic swaps, disk errors) is
in safety.py; the models are in model.py, their files in pretrained.py.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import random
import resource
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from tqdm import tqdm

from data import corpus
from distributed import (
    DIST_TIMEOUT_S,
    PREEMPTED_EXIT,
    SIGNALS,
    STOP_SIGNALS,
    Distributed,
    all_finite,
    check_shared,
    full_state_dict,
    on_rank_0,
)
from model import CONFIGS, Transformer
from pretrained import load_config, read_transformer, save_model
from safety import (
    CHANGEABLE,
    StepGuard,
    COUNT,
    NONNEGATIVE,
    NONNEGATIVE_INT,
    POSITIVE,
    check_dcp_metadata,
    check_fingerprint,
    check_state_files,
    clear_leftovers,
    file_digest,
    json_digest,
    load_dcp_state,
    number,
    replace_dir,
    writing,
)

ROOT = Path(__file__).resolve().parent


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


# LoRA, where a trainer asks for it (--lora-rank; off by default, as the paper trains every weight):
# PEFT's defaults (peft LoraConfig: lora_alpha 8; its target modules for LLaMA: q_proj, v_proj).
LORA_ALPHA = 8.0
LORA_TARGETS = ["q_proj", "v_proj"]


def add_trainer_args(
    p,
    *,
    unit: str,
    lr: float,
    batch_size: int,
    epochs: int,
    weight_decay: float,
    warmup_ratio: float,
    grad_clip: float,
    max_len: int,
):
    """The flags of the trainers that learn from a data set (SFT, reward model), with that
    trainer's defaults (each script cites where its defaults come from). `unit` names what a
    batch counts: conversations, pairs."""
    p.add_argument("--val-data", nargs="+", help="validation files; default: a split of --data")
    p.add_argument("--epochs", type=COUNT, default=epochs)
    p.add_argument("--warmup-ratio", type=number(least=0, most=1), default=warmup_ratio)
    p.add_argument(
        "--max-len", type=COUNT, help=f"tokens per sequence (default: {max_len}, or the model's context if shorter)"
    )
    p.add_argument("--eval-every", type=NONNEGATIVE_INT, default=0, help="steps between validations (0: once an epoch)")
    p.add_argument("--activation-checkpointing", action="store_true")
    p.add_argument(
        "--lora-rank",
        type=NONNEGATIVE_INT,
        default=0,
        help="train LoRA adapters of this rank in place of every weight (0: off, the paper's way); "
        "merged into plain weights in every checkpoint",
    )
    p.add_argument("--lora-alpha", type=POSITIVE, default=LORA_ALPHA, help="LoRA's scale is alpha / rank")
    p.add_argument(
        "--lora-targets", nargs="+", default=LORA_TARGETS, help="the blocks' linear layers that get adapters"
    )
    p.add_argument(
        "--log-every",
        type=NONNEGATIVE_INT,
        default=10,
        help="steps between progress lines when stderr is no terminal (a log, a pipe), which shows no "
        "progress bar (0: none)",
    )
    add_run_args(
        p,
        unit=unit,
        lr=lr,
        batch_size=batch_size,
        weight_decay=weight_decay,
        grad_clip=grad_clip,
        max_steps=0,
        max_steps_help="stop after this many optimizer steps (0: epochs decide)",
        save_every=100,
        save_every_help="steps between resumable states",
    )


def lora_fingerprint(args) -> list | None:
    """What of LoRA defines a run (safety.run_fingerprint's extra): None when it is off."""
    return [args.lora_rank, args.lora_alpha, sorted(args.lora_targets)] if args.lora_rank else None


def card_writer(
    stage: str, args, d: Distributed, *, base: str, digests: dict[str, str], total: int, unit: str, command: str
):
    """card(*figures) -> the README.md of one of this run's checkpoints (checkpoint.model_card): the
    figures of that checkpoint, then what holds for the whole run (LoRA, ranks, batch, lr, steps)."""
    from checkpoint import model_card

    run = (
        [
            f"LoRA rank {args.lora_rank}, alpha {args.lora_alpha:g}, on {' '.join(args.lora_targets)}; merged into "
            "the weights here"
        ]
        if getattr(args, "lora_rank", 0)
        else []
    )
    run.append(f"{d.world} rank(s), global batch {args.batch_size} {unit}, lr {args.lr}, {total} steps planned")

    def card(*figures: str) -> str:
        return model_card(stage, base=base, data=list(digests.items()), figures=[*figures, *run], command=command)

    return card


def add_run_args(
    p,
    *,
    unit: str,
    lr: float,
    batch_size: int,
    weight_decay: float,
    grad_clip: float,
    max_steps: int,
    max_steps_help: str,
    save_every: int,
    save_every_help: str,
):
    """The flags every trainer shares, PPO's included: where the run goes and how it resumes,
    the optimizer step and how it is split among ranks and micro-batches."""
    p.add_argument("--out", type=Path, help="output directory")
    p.add_argument("--max-steps", type=COUNT, default=max_steps, help=max_steps_help)
    p.add_argument("--batch-size", type=COUNT, default=batch_size, help=f"global batch, in {unit}")
    p.add_argument("--micro-batch-size", type=COUNT, default=1, help=f"{unit} per forward pass per rank")
    p.add_argument("--lr", type=NONNEGATIVE, default=lr)
    p.add_argument("--weight-decay", type=NONNEGATIVE, default=weight_decay)
    p.add_argument("--grad-clip", type=POSITIVE, default=grad_clip)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--save-every", type=COUNT, default=save_every, help=save_every_help)
    p.add_argument("--resume", action="store_true", help="continue from OUT/state (with the same settings and data)")
    p.add_argument(
        "--stop-signals",
        nargs="*",
        default=list(STOP_SIGNALS),
        choices=sorted(SIGNALS),
        help=f"signals that stop the run at the next step (every rank agreeing), with its state saved and "
        f"exit status {PREEMPTED_EXIT}; the same command then resumes it (see Preemption)",
    )
    p.add_argument(
        "--allow-change",
        nargs="+",
        choices=sorted(CHANGEABLE),
        default=[],
        help="with --resume: let these settings differ from the saved run's (the schedule follows "
        "the new values from the step resumed)",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="start over in an --out that holds an earlier run (its metrics and state are discarded)",
    )
    p.add_argument("--fp32", action="store_true", help="no bf16 mixed precision on GPU")
    p.add_argument(
        "--shard-ranks",
        type=COUNT,
        help="shard the model over groups of this many ranks (one node's GPUs) and replicate it across "
        "the groups (HSDP); default: over all ranks (FSDP). See distributed.device_mesh",
    )
    p.add_argument(
        "--grad-sync",
        choices=["every", "last"],
        default="every",
        help="reduce-scatter gradients after every micro-batch (ZeRO's way: each rank holds only "
        "its shard) or only after the last (fewer collectives, but a whole unsharded fp32 "
        "gradient on every rank); see train_sft.train_step",
    )
    p.add_argument(
        "--save-dtype",
        choices=sorted(SAVE_DTYPES),
        help="the dtype of best/ and final/ (the state stays fp32); default: the base model's torch_dtype, or bfloat16",
    )
    p.add_argument(
        "--dist-timeout",
        type=POSITIVE,
        default=DIST_TIMEOUT_S,
        help="seconds a rank waits in a collective for the others (a rank that died or hangs) before the "
        "run ends with one line saying so; rank 0's solo work at 13B (docs/scale.md) fits the default",
    )


def rendered_once(data_cache: Path | None, out: Path, key: dict, build, d: Distributed, labels: bool = True):
    """(entry, meta): the data.corpus cache entry of `key` in --data-cache (default
    OUT/data-cache), made once. Rank 0 renders a missing one alone (build, see
    data.corpus.build_entry), the other ranks waiting in one broadcast that also tells them
    whether it failed (data/ checks every line first: a bad one stops every rank); then every
    rank maps the same files. A rerun finds the entry and reads no data."""
    cache = data_cache or out / "data-cache"
    entry = cache / corpus.entry_name(key)

    def prepare():
        with writing(cache):  # a full disk names the cache directory
            corpus.ensure_entry(entry, key, build, labels, say=lambda line: print(line, flush=True))

    on_rank_0(prepare, d, "render the data")
    if data_cache:  # a directory of its own: one every rank must see, as --out
        check_shared(cache, d, "--data-cache")
    try:  # rank 0 has read every file against its digest; the others check the sizes and the record
        meta, problem = corpus.complete(entry, verify=False), "not there"
    except corpus.Damaged as e:
        meta, problem = None, str(e)
    if meta is None:
        raise SystemExit(f"rank {d.rank}: {entry}: {problem}; --data-cache must be a directory that every rank shares")
    return entry, meta


def load_model(spec: str, out: Path, d: Distributed, seed: int = 0):
    """An HF-format directory, or the name of a config in model.CONFIGS (`tiny`, the embedded
    default; randomly initialised, with the tokenizer trained on data/) -> (model on the meta
    device, read_weights, tokenizer). Nothing heavy happens here: read_weights() gives rank 0
    (None elsewhere) the weights as groups of tensors, one shard file each, read as they are
    consumed, so a trainer checks its data first and never spends minutes reading 26 GB to
    fail on a bad --data line. Only rank 0 reads them, one file at a time; load_sharded
    scatters each group before the next is read, so rank 0 holds one file's tensors, not the
    model, and 8 ranks on one node do not hold 8 copies."""
    from tokenizer import Tokenizer

    config = load_config(spec)
    if spec in CONFIGS and not Path(spec).is_dir():
        tok = tiny_tokenizer(out, d)

        def read_weights():
            return iter([Transformer.from_config(config, seed=seed).state_dict()]) if d.main else None
    else:
        tok = Tokenizer(Path(spec) / "tokenizer.model")

        def read_weights():
            return read_transformer(spec) if d.main else None

    tok.check_model_vocab(config.vocab_size, where=f"model {spec}")
    with torch.device("meta"):
        model = Transformer(config)
    return model, read_weights, tok


def eval_chunks(items: list, d: Distributed, micro: int):
    """This rank's share of `items` in micro-batches, as (chunk, real). Every rank yields the same
    number of chunks, because FSDP gathers weights collectively in each forward pass: a rank
    with nothing left gets a stand-in chunk (the first item) with real=False, to be ignored."""
    mine = items[d.rank :: d.world]
    for b in range(math.ceil(math.ceil(len(items) / d.world) / micro)):
        chunk = mine[b * micro : (b + 1) * micro]
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
    return torch.optim.AdamW(
        groups, lr=lr, betas=betas, fused=False, foreach=True
    )  # foreach: the CPU too (GPUs default to it)


def set_lr(optimizer: torch.optim.Optimizer, lr: float):
    for group in optimizer.param_groups:
        group["lr"] = lr


def update(optimizer: torch.optim.Optimizer, lr: float):
    """The optimizer's step at learning rate `lr`, the gradients then freed."""
    set_lr(optimizer, lr)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def micro_batches(global_batch: list, d: Distributed, micro_batch: int) -> list[list]:
    """This rank's share of a global batch (every world-th item), cut into micro-batches."""
    mine = global_batch[d.rank :: d.world]
    return [mine[i : i + micro_batch] for i in range(0, len(mine), micro_batch)]


def grad_norm_and_clip(model: torch.nn.Module, max_norm: float) -> torch.Tensor:
    """Clip the gradients to a total norm of max_norm; returns the norm before (a 0-d tensor)."""
    norm = torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.grad is not None], max_norm)
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm


# -- checkpoints ---------------------------------------------------------------------------------


class TrainState:
    """The resumable training state in OUT/state/: weights and optimizer through
    torch.distributed.checkpoint (each rank writes its own shards; a run can resume on another
    number of ranks), and trainer.json with the step, sampler position, best validation score
    and the RNG states of every rank. Written to OUT/state.tmp (trainer.json last) and renamed
    when complete, so OUT/state is always the last checkpoint that finished. Loading never
    unpickles anything but checkpoint metadata and plain values (safety.load_dcp_state)."""

    def __init__(self, out: Path, d: Distributed):
        self.dir, self.tmp, self.d = out / "state", out / "state.tmp", d
        self.old = out / "state.old"

    def exists(self) -> bool:
        return (self.dir / "trainer.json").is_file()

    def recover(self):
        """After a kill between save's two renames there is no state/ but a complete state.tmp
        (newer) and state.old: put the newest whole one in place. Whole: its trainer.json reads
        and matches the digest written in it, and every file it lists is there (the files' own
        digests are checked when it is loaded); an interrupted save's partial state (a kill or
        a full disk while trainer.json was written) is set aside as OUT/state.partial, said,
        and never promoted. Other leftovers are removed. Rank 0 only; call before exists()."""
        if not self.d.main:
            return
        if not self.exists():
            for candidate in (self.tmp, self.old):
                if not (candidate / "trainer.json").is_file():
                    continue
                problem = _not_whole(candidate)
                if problem is None:
                    shutil.rmtree(self.dir, ignore_errors=True)
                    os.rename(candidate, self.dir)
                    print(f"recovered the state of an interrupted save: {candidate} -> {self.dir}")
                    break
                aside = self.dir.with_name("state.partial")
                shutil.rmtree(aside, ignore_errors=True)
                os.rename(candidate, aside)
                print(f"{candidate}: an interrupted save left it partial ({problem}); set aside as {aside}, not used")
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
        rngs = [None] * self.d.world
        dist.all_gather_object(rngs, rng)  # a few KiB a rank
        if self.d.main:
            content = dict(trainer, rng=rngs, files=files)
            with writing(self.tmp):
                (self.tmp / "trainer.json").write_text(
                    json.dumps(dict(content, digest=json_digest(content))), encoding="utf-8"
                )
            replace_dir(self.tmp, self.dir, aside=self.old)
        self.d.barrier()

    def _digests(self, directory: Path, only: set[str] | None = None) -> dict[str, str]:
        """sha256 digests of the state's files, each rank hashing its share (every world-th file):
        a 13B state is 146 GiB, and 8 ranks read it 8 times faster than one."""
        names = sorted(
            f.name for f in directory.iterdir() if f.name != "trainer.json" and (only is None or f.name in only)
        )
        mine = {name: file_digest(directory / name) for name in names[self.d.rank :: self.d.world]}
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
            raise SystemExit(
                f"{path}: not a state this project wrote, or a damaged one ({e}); nothing was "
                "loaded: start over with --overwrite, or restore the file"
            ) from None
        if digest is not None and digest != json_digest(content):
            raise SystemExit(
                f"{path}: its contents are not what was saved (they do not match the digest written "
                "with them): changed or damaged since; nothing was loaded: start over with --overwrite, "
                "or restore the file"
            )
        return content

    def resume(self, args, fingerprint: dict, model, optimizer) -> dict | None:
        """Where a run starts. First what an interrupted save left behind is cleared up (rank 0:
        recover(), safety.clear_leftovers). Then, with --resume and a state here: refuse another
        fingerprint (safety.check_fingerprint), else load the weights and optimizer and return
        the trainer's part (it says "step"). None otherwise: the run starts from the beginning."""
        if self.d.main:
            clear_leftovers(self.dir.parent)
            self.recover()
        self.d.barrier()
        if not args.resume:
            return None
        if not self.exists():
            if self.d.main:
                print(f"--resume: no state in {self.dir.parent}, starting from the beginning")
            return None
        check_fingerprint(self.trainer().get("setup", {}), fingerprint, args.allow_change, self.dir)
        trainer = self.load(model, optimizer)
        if self.d.main:
            print(f"resumed from {self.dir} at step {trainer['step']}")
        return trainer

    def load(self, model, optimizer) -> dict:
        trainer = self.trainer()
        check_dcp_metadata(self.dir)  # a clear refusal before DCP's machinery reads anything
        saved = trainer.pop("files", None)
        if saved is not None:  # (states of earlier versions carry no digests and are not checked)
            on_disk = {f.name for f in self.dir.iterdir()}
            check_state_files(self.dir, saved, self._digests(self.dir, only=set(saved) & on_disk))
        msd, osd = get_state_dict(model, optimizer)
        state = {"model": msd, "optim": osd}
        load_dcp_state(state, self.dir)
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
        rngs = trainer.pop("rng")
        if len(rngs) == self.d.world:  # same number of ranks: each takes up its own RNG streams
            _set_rng_state(rngs[self.d.rank])
        return trainer


def _not_whole(directory: Path) -> str | None:
    """What is wrong with a state directory's trainer.json and file list, or None when whole."""
    try:
        content = json.loads((directory / "trainer.json").read_text(encoding="utf-8"))
        digest = content.pop("digest")
    except (OSError, ValueError, UnicodeDecodeError, AttributeError, KeyError) as e:
        return f"trainer.json cut short or unreadable: {type(e).__name__}"
    if digest != json_digest(content):
        return "trainer.json does not match its digest"
    missing = sorted(name for name in content.get("files", {}) if not (directory / name).is_file())
    return f"{missing[0]} is missing" if missing else None


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


SAVE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def save_dtype(choice: str | None, base: str) -> torch.dtype:
    """The dtype of the HF exports (best/, final/): --save-dtype, or else the base model's own
    (its config.json's torch_dtype, `dtype` in newer transformers; Ziya's release is fp16), or
    bf16 (a built-in config). The training state stays in fp32 whatever this is."""
    if choice:
        return SAVE_DTYPES[choice]
    config = Path(base) / "config.json"
    if config.is_file():
        hf = json.loads(config.read_text(encoding="utf-8"))
        name = hf.get("torch_dtype") or hf.get("dtype")
        if name in SAVE_DTYPES:
            return SAVE_DTYPES[name]
    return torch.bfloat16


def save_hf(model, path: Path, tokenizer, d: Distributed, card: str | None = None, *, dtype: torch.dtype | None = None):
    """Write the model in its own layout (pretrained.save_model, rank 0), atomically, in `dtype` (save_dtype;
    None: the weights' own), with `card` as its README.md (checkpoint.model_card); all ranks take part."""
    if not all_finite(model, d):  # never exported: a trainer stops with its step guard before this
        raise SystemExit(f"{path}: the weights are not finite; nothing was exported")
    sd = full_state_dict(model, dtype)
    if d.main:
        with writing(path):
            save_model(
                model,
                path,
                tokenizer=tokenizer,
                state_dict=sd,
                dtype=dtype,
                extra_files={"README.md": card.encode()} if card else None,
            )
    d.barrier()


# -- observability -------------------------------------------------------------------------------


class MetricsLog:
    """Append-only JSONL of training records, written by rank 0 only."""

    def __init__(self, path: Path, enabled: bool):
        self.path, self.enabled = path, enabled

    def truncate_after(self, step: int):
        """At a run's start: drop records of steps after the one it starts from (the state it
        resumes; -1, every record, when it starts from the beginning after a try that saved no
        state): they will be made again."""
        if self.enabled and self.path.is_file():
            lines = [line for line in self.path.read_text(encoding="utf-8").splitlines() if line.strip()]
            records = []
            for n, line in enumerate(lines, start=1):
                try:
                    records.append((line, json.loads(line)))
                except json.JSONDecodeError:
                    if n < len(lines):  # only the last line can be cut short by a kill
                        raise SystemExit(
                            f"{self.path}:{n}: not valid JSON, and not the last line; "
                            "this file was not written by an interrupted run alone"
                        ) from None
            kept = [line for line, r in records if r.get("step", 0) <= step]
            tmp = self.path.with_name(self.path.name + ".tmp")
            tmp.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
            os.replace(tmp, self.path)

    def write(self, **record):
        if self.enabled:
            with writing(self.path), open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(record, ensure_ascii=False) + "\n")


class Progress:
    """A run's progress on rank 0: tqdm's bar in a terminal; in a log file or a pipe, where no
    bar is drawn, a line every `log_every` steps with the time spent and to go."""

    def __init__(self, name: str, total: int, start: int, d: Distributed, log_every: int):
        self.total, self.start, self.main = total, start, d.main
        self.bar = tqdm(total=total, initial=start, disable=not d.main, desc=name)
        self.log_every = log_every if d.main and not sys.stderr.isatty() else 0
        self.started = time.monotonic()

    def step(self, step: int, loss: float, lr: float):
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.2e}")
        if self.log_every and step % self.log_every == 0:
            spent = time.monotonic() - self.started
            tqdm.write(
                f"step {step}/{self.total}: loss {loss:.4f}, lr {lr:.2e}, {spent:.0f} s so far, about "
                f"{spent / (step - self.start) * (self.total - step):.0f} s to go",
                file=sys.stdout,
            )

    def say(self, text: str):
        if self.main:
            tqdm.write(text, file=sys.stdout)

    def close(self):
        self.bar.close()


# -- the supervised trainers' loop, in blocks (train_sft.py and train_rm.py write the loop) ---------


@dataclass
class Schedule:
    """A supervised run's steps: an epoch is the sampler's batches, the run --epochs of them or
    --max-steps, the first --warmup-ratio of it warmup, validation every --eval-every steps
    (default: each epoch) and at the end."""

    steps_per_epoch: int
    total: int
    warmup: int
    eval_every: int

    @classmethod
    def of(cls, args, steps_per_epoch: int) -> "Schedule":
        total = min(args.epochs * steps_per_epoch, args.max_steps or args.epochs * steps_per_epoch)
        return cls(steps_per_epoch, total, round(args.warmup_ratio * total), args.eval_every or steps_per_epoch)

    def lr(self, step: int, peak: float) -> float:
        return cosine_lr(step, self.total, peak, self.warmup)

    def validates(self, step: int) -> bool:
        return step % self.eval_every == 0 or step == self.total

    def record(
        self, step: int, *, loss: float, lr: float, grad_norm: float, tokens: int, seconds: float, device
    ) -> dict:
        """A step's line of metrics.jsonl: its losses, rate and speed (`tokens` in `seconds`)."""
        return dict(
            step=step,
            epoch=round(step / self.steps_per_epoch, 3),
            loss=round(loss, 6),
            lr=lr,
            grad_norm=round(grad_norm, 6),
            tokens_per_s=round(tokens / seconds, 1),
            peak_mem_gb=round(peak_memory_gb(device), 3),
        )


class Run:
    """What a run keeps across its steps besides the model and the optimizer: the resumable
    state (TrainState), metrics.jsonl, the step guard (safety.StepGuard: no update from a broken
    loss or gradient, no state saved from weights that are not finite), the best validation so
    far, and where the loop starts. A resumed run continues at its saved step, with its best and
    its sampler's position (for PPO, its prompt stream's), and its metrics cut to that step; what
    else a trainer saved with the state (PPO: its round and KL coefficient) is `resumed`. The
    three trainers share it: SFT and RM save by steps, PPO by rounds (save's `at`)."""

    def __init__(self, args, d: Distributed, fingerprint: dict, model, opt, sampler):
        self.args, self.d, self.fingerprint = args, d, fingerprint
        self.model, self.opt, self.sampler = model, opt, sampler
        self.state, self.metrics = TrainState(args.out, d), MetricsLog(args.out / "metrics.jsonl", d.main)
        self.guard = StepGuard(args.out / "state")
        self.start, self.best = 0, None
        self.resumed = self.state.resume(args, fingerprint, model, opt) or None  # the state as save() wrote it
        if self.resumed:
            self.start, self.best = self.resumed["step"], self.resumed["best"]
            self.guard.saved = self.resumed.get("label", f"step {self.start}")
            sampler.load_state_dict(self.resumed["sampler"])
        self.metrics.truncate_after(self.start if self.resumed else -1)  # from the beginning: no earlier try's line

    def save(
        self,
        step: int,
        total: int,
        progress,
        *,
        at: int | None = None,
        label: str | None = None,
        stopped_at: str | None = None,
        **extra,
    ):
        """The resumable state every --save-every steps (or rounds: `at`, which --save-every and
        `total` then count) and at the end, with `extra` beside it. A stop signal (SIGTERM: a
        preemption) ends the run here, its state saved, every rank agreeing through one
        all-reduce (Preemption). `label` names the point in messages ("step 6", "round 3, step 6"),
        `stopped_at` in OUT/preempted (default: the label)."""
        at = step if at is None else at
        label = label or f"step {step}"
        stop = self.args.preemption.requested(self.d) and at < total
        if at % self.args.save_every == 0 or at == total or stop:
            self.guard.check_weights(label, all_finite(self.model, self.d, self.opt))
            state = {"step": step, "best": self.best, "sampler": self.sampler.state_dict(), "setup": self.fingerprint}
            self.state.save(self.model, self.opt, dict(state, label=label, **extra))
            self.guard.saved = label
        if stop:
            progress.close()
            self.args.preemption.stop(self.d, self.args.out, stopped_at or label)

    def finish(self, tok, card, export, total: int, best: str | None):
        """final/ (the last weights, with their model card), and the run's last line; `best`
        describes best/ when there is one."""
        out = self.args.out
        kept = [f"best {best} (kept in best/)"] if best else []
        save_hf(
            self.model, out / "final", tok.path, self.d, card(f"step {total}: the final weights", *kept), dtype=export
        )
        if self.d.main:
            where = f"best {best} in {out / 'best'}; " if best else ""
            print(f"done: {total} steps; {where}final weights in {out / 'final'}")


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


def tiny_tokenizer(out: Path, d: Distributed):
    """The embedded default's tokenizer, trained by rank 0 into OUT/tokenizer.model."""
    from tokenizer import Tokenizer

    path = out / "tokenizer.model"
    if d.main and not path.is_file():
        train_tiny_tokenizer(path)
    d.barrier()
    return Tokenizer(path)


def train_tiny_tokenizer(path: Path, vocab_size: int = 2048):
    """The embedded default's tokenizer: trained on the text shipped in data/ (deterministic)."""
    from tokenizer import corpus_sentences, train_tokenizer

    files = sorted(str(f) for f in (ROOT / "data").glob("*/*.jsonl"))
    return train_tokenizer(corpus_sentences(files), path, vocab_size=vocab_size)
