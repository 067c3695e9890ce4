"""Supervised fine-tuning on the hybrid data (paper §3.1, App. E), with FSDP on 1 to N ranks.

    # the embedded default, on a laptop CPU
    python train_sft.py --model tiny --data data/sft/*.jsonl --out runs/sft --batch-size 8 --lr 2e-3 --epochs 6
    # the paper's run: Ziya-LLaMA-13B on 8 GPUs
    torchrun --nproc_per_node 8 train_sft.py --model ziya-13b --data sft_mix/train.jsonl \
        --val-data sft_mix/val.jsonl --out runs/sft-13b --micro-batch-size 2 --activation-checkpointing
    # will it fit, and how long? per-rank memory (--simulate: measured, plan.py) and the hours
    python train_sft.py --model ziya-13b --dry-run --world-size 8 [--simulate]

Each optimizer step takes one global batch of --batch-size conversations (the same batches
whatever the number of ranks), renders them with the HuatuoGPT template, and minimises the
next-token loss on the doctor's replies only. The loss is the sum over every labelled token
of the global batch divided by their number, so 1 process and N processes follow the same
trajectory. Outputs in --out:

    metrics.jsonl   one record per optimizer step, and one per validation
    best/           the weights that did best on validation, HF layout (paper App. E)
    final/          the weights at the end, HF layout
    state/          the resumable state (--resume), rewritten every --save-every steps
"""

from __future__ import annotations

import argparse
import itertools
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from data import corpus
from data.mixing import LengthGroupedBatches
from data.readers import add_input_args
from data.template import IGNORE_INDEX, collate
from lora import add_lora, check_lora, lora_init
from model import at_least_fp32
from plan import add_plan_args, given_settings, lm_dry_run
from safety import data_digests, file_digest, model_fingerprint, run_fingerprint
from training import (
    HelpFormatter,
    Progress,
    Run,
    Schedule,
    Timer,
    add_trainer_args,
    card_writer,
    eval_chunks,
    grad_norm_and_clip,
    load_model,
    lora_fingerprint,
    make_optimizer,
    micro_batches,
    rendered_once,
    save_dtype,
    save_hf,
    update,
)
from distributed import device_mesh, exit_trainer, mixed_precision, run_distributed, shard_and_load

# Paper App. E: "we set the learning rate, batch size, and maximum context length to 5e-5,
# 128, and 2048 ... All models are trained for 3 epochs and weights performed the best on the
# validation set are saved."
LR = 5e-5
BATCH_SIZE = 128
MAX_LEN = 2048
EPOCHS = 3
# The paper is silent on these; the official recipe uses them (HuatuoGPT repo: scripts/finetune.py
# --weight_decay 0.1, --warmup_rates 0.05, get_cosine_schedule_with_warmup, AdamW's default betas;
# scripts/sft.yaml: DeepSpeed ZeRO-3, gradient_clipping 1.0). Deviations from that recipe, each
# labelled where it is made: bf16 rather than fp16 mixed precision (GPU runs; bf16 needs no loss
# scaling), FSDP2 standing in for ZeRO-3, no weight decay on norm gains (training.make_optimizer),
# whole-round truncation (data/template.py), the best validation checkpoint kept (paper App. E).
WEIGHT_DECAY = 0.1
WARMUP_RATIO = 0.05
GRAD_CLIP = 1.0
VAL_FRACTION = 0.05  # when no --val-data is given


def token_loss_sum(model, batch) -> torch.Tensor:
    """Sum of next-token cross-entropies over the labelled positions of a right-padded batch.

    Right padding needs no attention mask: causal attention never lets a real token see the
    padding after it, and padded positions carry the label -100.
    """
    logits = at_least_fp32(model(batch["tokens"][:, :-1]))
    return F.cross_entropy(
        logits.flatten(0, 1), batch["labels"][:, 1:].flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
    )


def batch_loss(model, items, pad_id: int, device) -> torch.Tensor:
    """The summed loss of one micro-batch of rendered conversations (what a step accumulates)."""
    return token_loss_sum(model, {key: t.to(device) for key, t in collate(items, pad_id).items()})


def n_labels(item) -> int:
    """Labelled tokens of one rendered conversation (the first position predicts nothing): the
    corpus's count, read without touching its labels (every rank counts the whole batch)."""
    if item.labelled is not None:
        return item.labelled
    return int(np.count_nonzero(np.asarray(item.labels[1:]) != IGNORE_INDEX))


@torch.no_grad()
def validation_loss(model, items, d, micro: int, pad_id: int) -> float:
    """Token-weighted mean loss over `items`, split across ranks."""
    model.eval()
    total = count = 0.0
    for chunk, real in eval_chunks(items, d, micro):
        batch = {k: v.to(d.device) for k, v in collate(chunk, pad_id).items()}
        loss = token_loss_sum(model, batch)
        if real:
            total += loss.item()
            count += sum(n_labels(x) for x in chunk)
    model.train()
    return d.all_sum(total) / d.all_sum(count)


def rendered_data(args, digests: dict[str, str], tok, d):
    """(train, val, report summary): the rendered corpus of this run's data, from the cache
    (--data-cache, default OUT/data-cache; data.corpus, training.rendered_once), memory-mapped
    by every rank."""
    key = {
        "data": sorted(digests[f] for f in args.data),
        "val_data": [digests[f] for f in args.val_data or []],
        "format": args.format,
        "encoding": args.encoding,
        "seed": args.seed,
        "max_len": args.max_len,
        "val_fraction": 0 if args.val_data else VAL_FRACTION,
        "tokenizer": file_digest(tok.path),
        "add_bos": tok.add_bos,  # the tokenizer_config.json beside it: does a prompt start with <s>
    }
    # The files in an order of their own (by content), so that the split, the batches and a
    # resumed run do not depend on the order of --data.
    entry, meta = rendered_once(
        args.data_cache,
        args.out,
        key,
        lambda: corpus.sft_data(
            sorted(args.data, key=digests.get),
            args.val_data,
            tok,
            max_len=args.max_len,
            seed=args.seed,
            val_fraction=VAL_FRACTION,
            fmt=args.format,
            encoding=args.encoding,
        ),
        d,
    )
    return corpus.Corpus(entry / "train"), corpus.Corpus(entry / "val"), meta["summary"]


def training_data(args, tok, d):
    """The run's data, read, deduplicated, split and rendered once (rendered_data), and its
    batches -> (the files' digests, train, val, sampler). The digests: each file read once, for
    the cache, the fingerprint and the model card."""
    digests = data_digests(args)
    train_items, val_items, summary = rendered_data(args, digests, tok, d)
    sampler = LengthGroupedBatches(train_items.lengths, args.batch_size, seed=args.seed, drop_last=True)
    if len(sampler) == 0:
        raise SystemExit(f"{len(train_items)} training conversations make no full batch of {args.batch_size}")
    if d.main:
        print(
            f"{len(train_items)} training / {len(val_items)} validation conversations; {len(sampler)} "
            f"steps an epoch; {d.world} rank(s) on {d.device}"
        )
        if summary:
            print(summary)
    return digests, train_items, val_items, sampler


def arg_parser() -> argparse.ArgumentParser:
    """This trainer's command line (plan.layout_defaults reads its defaults)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--model", required=True, help="an HF-format directory, or 'tiny' (the embedded default)")
    p.add_argument("--data", nargs="+", help="training files, any format data/ reads")
    add_input_args(p)
    p.add_argument(
        "--data-cache",
        type=Path,
        help="where the rendered data is kept, one entry per data, tokenizer and "
        "settings (data/corpus.py); several runs on the same data may share one. Default: OUT/data-cache",
    )
    add_trainer_args(
        p,
        unit="conversations",
        lr=LR,
        batch_size=BATCH_SIZE,
        epochs=EPOCHS,
        weight_decay=WEIGHT_DECAY,
        warmup_ratio=WARMUP_RATIO,
        grad_clip=GRAD_CLIP,
        max_len=MAX_LEN,
    )
    add_plan_args(p, items_help="conversations an epoch (default: the 226,042 of Table 3's medical parts)")
    return p


def main(argv=None):
    p = arg_parser()
    args = p.parse_args(argv)
    if args.dry_run:
        return lm_dry_run(args, "sft", train_step, settings=given_settings(p, args))
    if not args.data or not args.out:
        p.error("--data and --out are required (unless --dry-run)")
    run_distributed(_train, args)


def train_step(
    model, d, batch: list, *, micro_batch: int, pad_id: int, grad_clip: float, grad_sync: str = "every"
) -> tuple[torch.Tensor, torch.Tensor]:
    """The gradient of one global batch of rendered conversations -> (its loss, the gradient
    norm before clipping), 0-d tensors read once a step by the caller: nothing here waits for
    the device (a .item() per micro-batch would stall a GPU's queue). No update.

    This rank takes every world-th conversation and runs them in micro-batches. grad_sync
    "every" reduce-scatters each micro-batch's gradient as soon as its backward is done, so a
    rank holds only its shard of the gradient between micro-batches (ZeRO's way, the paper's
    optimizer, App. E); "last" waits for the last micro-batch, holding the whole unsharded fp32
    gradient meanwhile (+4 bytes a parameter) for fewer collectives (plan.training_memory)."""
    n_units = sum(n_labels(x) for x in batch)  # labelled tokens of the whole global batch
    chunks = micro_batches(batch, d, micro_batch)
    total = torch.zeros((), dtype=torch.float64, device=d.device)
    for k, chunk in enumerate(chunks):
        model.set_requires_gradient_sync(grad_sync == "every" or k == len(chunks) - 1)
        loss_sum = batch_loss(model, chunk, pad_id, d.device)
        # FSDP averages gradients over ranks; scaling by the world size turns that average into
        # a sum, so the gradient is that of (sum of token losses) / (labelled tokens of the
        # global batch): 1 rank and N ranks take the same step.
        (loss_sum * d.world / n_units).backward()
        total += loss_sum.detach()
    dist.all_reduce(total)
    return total / n_units, grad_norm_and_clip(model, grad_clip)


def check_model_args(args, model):
    """--max-len (default: the paper's, within the model's context) and --lora-* against the model."""
    if args.max_len is None:
        args.max_len = min(MAX_LEN, model.config.max_position_embeddings)
    if args.max_len > model.config.max_position_embeddings:
        raise SystemExit(
            f"--max-len {args.max_len} exceeds the model's context of "
            f"{model.config.max_position_embeddings} ({args.model})"
        )
    if args.lora_rank:
        check_lora(model, args.lora_rank, args.lora_targets)


def sharded_model(args, d, model, read_weights):
    """The model on the meta device -> sharded over the ranks (FSDP2) and filled from rank 0's
    weights, file by file; with --lora-rank, adapters added and only they train."""
    model.activation_checkpointing = args.activation_checkpointing
    if args.lora_rank:  # adapters only, the rest frozen (ours, off by default; the paper trains every weight)
        add_lora(model, args.lora_rank, args.lora_alpha, args.lora_targets)
    weights = read_weights()  # rank 0: the base's tensors, file by file, read as they are scattered
    if args.lora_rank and d.main:
        weights = itertools.chain(weights, [lora_init(model, args.seed)])
    return shard_and_load(
        model,
        weights,
        d,
        bf16=mixed_precision(d, args),
        frozen_bf16=bool(args.lora_rank),
        mesh=device_mesh(d.device.type, d.world, args.shard_ranks),
    )


def train_flops_per_token(cfg) -> int:
    """Training FLOPs per token, for MFU: 6 per weight of every matrix product (forward 2,
    backward 4); the embedding is a lookup, not a product (a tied table is also the head).
    Attention scores add ~12·layers·hidden·T more, left out: the MFU is slightly conservative."""
    return 6 * (cfg.num_params() - (0 if cfg.tie_word_embeddings else cfg.vocab_size * cfg.hidden_size))


def _train(args, d):
    out = args.out
    model, read_weights, tok = load_model(args.model, out, d, seed=args.seed)
    check_model_args(args, model)  # before the data is read

    digests, train_items, val_items, sampler = training_data(args, tok, d)  # checked before any expensive work

    model = sharded_model(args, d, model, read_weights)
    model.train()

    # The schedule, the optimizer and what a resume continues from (run.best: the lowest
    # validation loss so far).
    schedule, opt = Schedule.of(args, len(sampler)), make_optimizer(model, args.lr, args.weight_decay)
    total = schedule.total
    fingerprint = run_fingerprint(args, digests, model=model_fingerprint(args.model), lora=lora_fingerprint(args))
    card = card_writer(
        "sft", args, d, base=args.model, digests=digests, total=total, unit="conversations", command="train_sft.py"
    )  # the README.md of each checkpoint
    export = save_dtype(args.save_dtype, args.model)  # best/, final/: the base model's dtype
    run = Run(args, d, fingerprint, model, opt, sampler)
    metrics, guard = run.metrics, run.guard
    if not run.resumed and val_items:  # where validation starts from
        metrics.write(
            step=0,
            val_loss=round(validation_loss(model, val_items, d, args.micro_batch_size, tok.pad_id), 6),
            best=False,
        )
    flops_per_token = train_flops_per_token(model.config)

    batches, timer = iter(sampler), Timer()
    progress = Progress("sft", total, run.start, d, args.log_every)
    for step in range(run.start + 1, total + 1):
        # 1. The global batch: the same conversations whatever the number of ranks.
        batch = [train_items[i] for i in next(batches)]
        # 2. Forward, loss and backward, micro-batch by micro-batch; the gradient clipped.
        loss, grad_norm = map(
            float,
            train_step(
                model,
                d,
                batch,
                micro_batch=args.micro_batch_size,
                pad_id=tok.pad_id,
                grad_clip=args.grad_clip,
                grad_sync=args.grad_sync,
            ),
        )
        guard.check(step, loss, grad_norm)  # no update from a loss or gradient that is broken
        # 3. The update, at the step's learning rate.
        lr = schedule.lr(step, args.lr)
        update(opt, lr)
        # 4. One line of metrics.
        dt, seen = timer.lap(), sum(len(x.ids) for x in batch)
        record = schedule.record(step, loss=loss, lr=lr, grad_norm=grad_norm, tokens=seen, seconds=dt, device=d.device)
        if args.peak_tflops and d.device.type == "cuda":
            record["mfu"] = round(seen / dt * flops_per_token / (args.peak_tflops * 1e12 * d.world), 4)
        metrics.write(**record)
        progress.step(step, loss, lr)
        # 5. Validation; best/ keeps the weights of the lowest loss (paper App. E).
        if val_items and schedule.validates(step):
            val_loss = validation_loss(model, val_items, d, args.micro_batch_size, tok.pad_id)
            improved = guard.sound({"val_loss": val_loss}) and (run.best is None or val_loss < run.best["val_loss"])
            metrics.write(step=step, val_loss=round(val_loss, 6), best=improved)
            progress.say(f"step {step}: validation loss {val_loss:.4f}" + (" (best: saving best/)" if improved else ""))
            if improved:
                run.best = {"val_loss": val_loss}
                save_hf(
                    model,
                    out / "best",
                    tok.path,
                    d,
                    card(f"validation loss {val_loss:.4f} at step {step} (best/)"),
                    dtype=export,
                )
        # 6. The resumable state; a stop signal (a preemption) ends the run here, its state saved.
        run.save(step, total, progress)
        timer.lap()  # validation and checkpoints do not count against tokens/s
    progress.close()
    run.finish(tok, card, export, total, run.best and f"validation loss {run.best['val_loss']:.4f}")


if __name__ == "__main__":
    exit_trainer(main)
