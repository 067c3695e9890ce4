"""The reward model of RLMF (paper §3.2): sample responses from the SFT model, then train a
pairwise reward model on mixed-feedback preferences (distill.py score) and report accuracy.

    # 1. k responses per SFT prompt, for distill.py score to rate against the doctor's answer
    python train_rm.py sample --model runs/sft/best --data data/sft/*.jsonl --out samples.jsonl -k 4
    python distill.py score --input samples.jsonl --out pairs.jsonl
    # 2. the reward model, initialised from the SFT checkpoint (1 or N ranks, as train_sft.py)
    python train_rm.py --model runs/sft/best --data pairs.jsonl --out runs/rm
    # 3. rewards of given conversations (each ends with the reply to score)
    python train_rm.py score --model runs/rm/best --data conversations.jsonl
    # will it fit, and how long? (plan.py; --simulate measures this code's step)
    python train_rm.py --model ziya-13b --dry-run --world-size 8 [--simulate]

The reward is a scalar head on the final (normed) hidden state of the reply's last token,
which is always its eos: render_reply ends every scored sequence with the eos that closes the
reply, and the index of that token is found from the attention mask, so the score is the same
with left or right padding and whatever else is in the batch. PPO scores what the policy
sampled as token ids (score_ids), never decoded and re-encoded text: decode -> encode is not
the identity, and the reward must be that of the very sequence the policy produced. The loss is
-log σ(r_chosen − r_rejected − margin); chosen and rejected go through one forward pass.
Outputs in --out: metrics.jsonl, best/ (highest validation accuracy), final/, state/ (--resume);
a checkpoint is in the HF reward-model layout (LlamaForSequenceClassification: score.weight,
num_labels 1; pretrained.save_reward_model), with reward_config.json and a README.md.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import random
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

from data.mixing import LengthGroupedBatches, dedup_key
from data.readers import add_input_args, read
from data.schema import Report, finished_ids
from data.template import pad_batch, render, render_reply, reward_ids
from generate import CompiledStep, add_device_args, device_and_dtype, generate
from generate import load as generate_load
from lora import add_lora, check_lora, lora_init
from model import RewardModel
from pretrained import load_reward_model
from plan import add_plan_args, given_settings, lm_dry_run
from safety import (
    COUNT,
    FINITE,
    NONNEGATIVE,
    SHARE,
    claim_output,
    data_digests,
    file_digest,
    model_digest,
    model_fingerprint,
    number,
    run_fingerprint,
)
from tokenizer import Tokenizer
from training import (
    HelpFormatter,
    Run,
    Schedule,
    Progress,
    Timer,
    add_trainer_args,
    card_writer,
    eval_chunks,
    grad_norm_and_clip,
    load_model,
    lora_fingerprint,
    make_optimizer,
    micro_batches,
    save_dtype,
    save_hf,
    update,
)
from distributed import device_mesh, exit_trainer, mixed_precision, run_distributed, shard_and_load

# The paper gives no hyperparameters for the reward model (App. E speaks of SFT and RL only).
# Our choices: the SFT context and recipe (weight decay 0.1, 5% warmup, cosine, clip 1.0), a
# learning rate 5x lower than SFT's because the trunk starts from the SFT weights and only has
# to learn a ranking, and one epoch, since reward models overfit preference data quickly
# (InstructGPT trains its reward model for a single epoch).
LR = 1e-5
BATCH_SIZE = 64  # pairs
EPOCHS = 1
MAX_LEN = 2048
WEIGHT_DECAY, WARMUP_RATIO, GRAD_CLIP = 0.1, 0.05, 1.0
MARGIN = 0.0
VAL_FRACTION = 0.2
SAMPLES_PER_PROMPT = 4  # k responses per prompt; distill.py score rates k(k-1)/2 pairs
# Room for a whole HuatuoGPT-style answer: the official demo samples up to 512 new tokens. A
# response that reaches the limit without eos is marked unfinished, and distill.py score does
# not rate it: a cut-off answer judged against a whole doctor's reply says nothing useful.
MAX_NEW_TOKENS = 512
# Prompts sampled together (x k responses each). 4 x 4 = 16 sequences of up to 2,048 positions
# fit one 80 GB GPU at 13B with the longest prompts (plan.py: 50.7 GiB); 8 x 4 did not (75.7 GiB:
# the KV cache alone is 50 GiB). Short prompts leave room for more.
SAMPLE_BATCH_SIZE = 4
# Paper §3.2: responses are rated "against responses from real doctors" on "authentic
# instructions and dialogues". ChatGPT's answers in the distilled parts are no doctor's.
DISTILLED_SOURCES = ("distilled_instruction", "distilled_conversation")


def pairwise_loss(chosen: torch.Tensor, rejected: torch.Tensor, margin: float = MARGIN) -> torch.Tensor:
    """-log σ(r_chosen − r_rejected − margin), per pair; log 2 when the two rewards are equal."""
    return -F.logsigmoid(chosen - rejected - margin)


def pair_rewards(model, pairs: list[dict], pad_id: int, device):
    """Rewards of the chosen and the rejected replies of `pairs`, in one forward pass."""
    seqs = [p["chosen_ids"] for p in pairs] + [p["rejected_ids"] for p in pairs]
    tokens, mask = pad_batch(seqs, pad_id)
    r = model(tokens.to(device), mask.to(device))
    return r[: len(pairs)], r[len(pairs) :]


def pairs_loss(model, pairs: list[dict], pad_id: int, device, margin: float = MARGIN) -> torch.Tensor:
    """The summed pairwise loss of one micro-batch of pairs (what a step accumulates)."""
    return pairwise_loss(*pair_rewards(model, pairs, pad_id, device), margin).sum()


def split_by_prompt(records: list[dict], val_fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """(train, validation) with every prompt's pairs on one side. distill.py score writes up to
    k(k-1)/2 pairs per prompt, so a split by pair would also train on the held-out prompts and
    their responses. Exact duplicate pairs are dropped; neither the split nor the order of the
    pairs depends on the order of the files or of the records (prompts and pairs are ordered by
    content before the seeded shuffle)."""
    groups: dict[str, list[dict]] = {}
    seen = set()
    for r in records:
        key = dedup_key(r)
        if key not in seen:
            seen.add(key)
            groups.setdefault(json.dumps(r["messages"], ensure_ascii=False, sort_keys=True), []).append(r)
    prompts = sorted(groups)
    for k in prompts:
        groups[k].sort(key=dedup_key)
    random.Random(f"{seed}:reward-model-split").shuffle(prompts)
    n_val = math.ceil(len(prompts) * val_fraction) if val_fraction > 0 and len(prompts) > 1 else 0
    return ([r for k in prompts[n_val:] for r in groups[k]], [r for k in prompts[:n_val] for r in groups[k]])


def encode_pairs(records, tok, max_len, report: Report) -> list[dict]:
    """Token ids of both replies of each pair; a pair whose question and reply cannot fit in
    max_len together (the oldest rounds already dropped) is skipped and counted."""
    out = []
    for r in records:
        try:
            chosen, _ = render_reply(tok, r["messages"], r["chosen"], max_len=max_len)
            rejected, _ = render_reply(tok, r["messages"], r["rejected"], max_len=max_len)
        except ValueError:
            report.skip(f"question + reply longer than --max-len {max_len}", r["id"])
            continue
        out.append({"id": r["id"], "chosen_ids": chosen, "rejected_ids": rejected})
    return out


@torch.no_grad()
def validate_pairs(model, pairs, d, micro: int, pad_id: int) -> dict:
    """Pairwise accuracy (r_chosen > r_rejected, ties half) and mean margin, over all ranks:
    {"val_accuracy", "val_margin"}, as metrics.jsonl records them."""
    model.eval()
    correct = margin = 0.0
    for chunk, real in eval_chunks(pairs, d, micro):
        c, r = pair_rewards(model, chunk, pad_id, d.device)
        if real:  # a tie counts half: a model with no preference scores chance, 0.5
            correct += ((c > r).float() + 0.5 * (c == r).float()).sum().item()
            margin += (c - r).sum().item()
    model.train()
    n = len(pairs)
    return {"val_accuracy": d.all_sum(correct) / n, "val_margin": d.all_sum(margin) / n}


def train_step(
    model,
    d,
    batch: list[dict],
    *,
    micro_batch: int,
    pad_id: int,
    margin: float,
    grad_clip: float,
    grad_sync: str = "every",
) -> tuple[torch.Tensor, torch.Tensor]:
    """The gradient of one global batch of pairs -> (its mean loss, the gradient norm before
    clipping), 0-d tensors the caller reads (as train_sft.train_step, which says why). No update."""
    chunks = micro_batches(batch, d, micro_batch)
    total = torch.zeros((), dtype=torch.float64, device=d.device)
    for k, chunk in enumerate(chunks):
        model.set_requires_gradient_sync(grad_sync == "every" or k == len(chunks) - 1)
        loss_sum = pairs_loss(model, chunk, pad_id, d.device, margin)
        # FSDP averages over ranks; × world makes it a sum: the gradient of (summed pair losses) /
        # (pairs in the global batch), the same on 1 rank as on N.
        (loss_sum * d.world / len(batch)).backward()
        total += loss_sum.detach()
    dist.all_reduce(total)
    return total / len(batch), grad_norm_and_clip(model, grad_clip)


def read_pairs(args, tok, max_len: int, report: Report) -> tuple[list, list]:
    """--data's pairs split by prompt (or --val-data's for validation), encoded -> (train, val)."""
    records = [r for f in args.data for r in read(f, "pairs", report=report, encoding=args.encoding)]
    train_records, val_records = split_by_prompt(records, 0 if args.val_data else VAL_FRACTION, args.seed)
    if args.val_data:
        val_records = [r for f in args.val_data for r in read(f, "pairs", report=report, encoding=args.encoding)]
    return encode_pairs(train_records, tok, max_len, report), encode_pairs(val_records, tok, max_len, report)


def training_pairs(args, tok, max_len: int, d) -> tuple[list, list, LengthGroupedBatches]:
    """The run's pairs (read_pairs) and their batches -> (train, val, sampler)."""
    report = Report()
    train_pairs, val_pairs = read_pairs(args, tok, max_len, report)
    sampler = LengthGroupedBatches(
        [len(p["chosen_ids"]) + len(p["rejected_ids"]) for p in train_pairs],
        args.batch_size,
        seed=args.seed,
        drop_last=True,
    )
    if len(sampler) == 0:
        raise SystemExit(f"{len(train_pairs)} training pairs make no full batch of {args.batch_size}")
    if d.main:
        print(
            f"{len(train_pairs)} training / {len(val_pairs)} validation pairs (split by prompt); "
            f"{len(sampler)} steps an epoch; {d.world} rank(s)"
        )
        if report:
            print(report.summary())
    return train_pairs, val_pairs, sampler


def reward_model(args, d, config, read_weights):
    """The reward model, sharded over the ranks (FSDP2): its trunk filled from the SFT model's
    weights, file by file from rank 0, and its head at zero, so every reward starts at 0 and the
    first loss is exactly log 2 (the model begins with no preference); with --lora-rank, adapters
    and the head train, the trunk frozen."""
    with torch.device("meta"):
        model = RewardModel(config)
    model.trunk.activation_checkpointing = args.activation_checkpointing
    if args.lora_rank:  # adapters and the score head trained, the trunk frozen (ours, off by default)
        add_lora(model, args.lora_rank, args.lora_alpha, args.lora_targets)
        model.score_head.requires_grad_(True)
    weights = None  # rank 0: the SFT model's tensors file by file, as the trunk's, then the head's
    if d.main:
        head = {
            "score_head.weight": torch.zeros(1, config.hidden_size),
            **(lora_init(model, args.seed) if args.lora_rank else {}),
        }
        weights = itertools.chain(({f"trunk.{k}": v for k, v in group.items()} for group in read_weights()), [head])
    return shard_and_load(
        model,
        weights,
        d,
        bf16=mixed_precision(d, args),
        frozen_bf16=bool(args.lora_rank),
        mesh=device_mesh(d.device.type, d.world, args.shard_ranks),
    )


def _train(args, d):
    out = args.out
    trunk, read_weights, tok = load_model(args.model, out, d, seed=args.seed)
    max_len = args.max_len or min(MAX_LEN, trunk.config.max_position_embeddings)
    if max_len > trunk.config.max_position_embeddings:
        raise SystemExit(f"--max-len {max_len} exceeds the model's context of {trunk.config.max_position_embeddings}")
    if args.lora_rank:
        check_lora(trunk, args.lora_rank, args.lora_targets)  # before the data is read

    train_pairs, val_pairs, sampler = training_pairs(args, tok, max_len, d)

    model = reward_model(args, d, trunk.config, read_weights)
    model.train()

    # The schedule, the optimizer and what a resume continues from (run.best: the validation of
    # the highest accuracy so far, then margin).
    schedule, opt = Schedule.of(args, len(sampler)), make_optimizer(model, args.lr, args.weight_decay)
    total = schedule.total
    digests = data_digests(args)  # each file read once: fingerprint and model card
    fingerprint = run_fingerprint(
        args, digests, model=model_fingerprint(args.model), margin=args.margin, lora=lora_fingerprint(args)
    )
    card = card_writer(
        "rm", args, d, base=args.model, digests=digests, total=total, unit="pairs", command="train_rm.py"
    )  # the README.md of each checkpoint
    export = save_dtype(args.save_dtype, args.model)  # best/, final/: the base model's dtype
    run = Run(args, d, fingerprint, model, opt, sampler)
    metrics, guard = run.metrics, run.guard
    if not run.resumed and val_pairs:  # where validation starts from
        v = validate_pairs(model, val_pairs, d, args.micro_batch_size, tok.pad_id)
        metrics.write(step=0, **{k: round(x, 6) for k, x in v.items()}, best=False)

    batches, timer = iter(sampler), Timer()
    progress = Progress("rm", total, run.start, d, args.log_every)
    for step in range(run.start + 1, total + 1):
        # 1. The global batch of pairs: the same whatever the number of ranks.
        batch = [train_pairs[i] for i in next(batches)]
        # 2. Forward (chosen and rejected together), loss and backward by micro-batch; the clip.
        loss, grad_norm = map(
            float,
            train_step(
                model,
                d,
                batch,
                micro_batch=args.micro_batch_size,
                pad_id=tok.pad_id,
                margin=args.margin,
                grad_clip=args.grad_clip,
                grad_sync=args.grad_sync,
            ),
        )
        guard.check(step, loss, grad_norm)  # no update from a loss or gradient that is broken
        # 3. The update, at the step's learning rate.
        lr = schedule.lr(step, args.lr)
        update(opt, lr)
        # 4. One line of metrics.
        dt, seen = timer.lap(), sum(len(p["chosen_ids"]) + len(p["rejected_ids"]) for p in batch)
        metrics.write(
            **schedule.record(step, loss=loss, lr=lr, grad_norm=grad_norm, tokens=seen, seconds=dt, device=d.device)
        )
        progress.step(step, loss, lr)
        # 5. Validation; best/ keeps the highest held-out accuracy, ties broken by the margin.
        if val_pairs and schedule.validates(step):
            v = validate_pairs(model, val_pairs, d, args.micro_batch_size, tok.pad_id)
            improved = guard.sound(v) and (
                run.best is None
                or (v["val_accuracy"], v["val_margin"]) > (run.best["val_accuracy"], run.best["val_margin"])
            )
            metrics.write(step=step, **{k: round(x, 6) for k, x in v.items()}, best=improved)
            progress.say(f"step {step}: {describe(v)}" + (" (best: saving best/)" if improved else ""))
            if improved:
                run.best = v
                save_hf(model, out / "best", tok.path, d, card(f"step {step}: {describe(v)} (best/)"), dtype=export)
        # 6. The resumable state; a stop signal (a preemption) ends the run here, its state saved.
        run.save(step, total, progress)
        timer.lap()  # validation and checkpoints do not count against tokens/s
    progress.close()
    run.finish(tok, card, export, total, run.best and describe(run.best))


def describe(v: dict) -> str:
    return f"held-out accuracy {v['val_accuracy']:.3f}, mean margin {v['val_margin']:.3f}"


# -- sampling and scoring --------------------------------------------------------------------------


def doctor_prompt(record: dict):
    """(prompt messages, the real doctor's reply to it) of an SFT conversation, or None for
    distilled data. Polished data keeps the doctor's own words in meta (distill.py polish-qa:
    original_answer; polish-dialogue: the original turns); raw doctor data is its own."""
    if record.get("source") in DISTILLED_SOURCES:
        return None
    meta = record.get("meta") or {}
    messages = meta.get("original") or record["messages"]
    if messages[-1]["role"] != "assistant":
        return None
    return messages[:-1], meta.get("original_answer") or messages[-1]["content"]


def sample(args):
    """k responses per prompt from an SFT checkpoint -> {"id", "messages", "reference",
    "responses", "finished"}. A prompt is the last round of a real doctor's conversation with
    its history, and the reference is that doctor's answer (doctor_prompt), which distill.py
    score compares against. `finished` marks the responses that ended with eos. A distilled
    record, one with no answer, or one whose question does not fit the context beside
    --max-new-tokens is skipped and counted. Resumable."""
    device, dtype = device_and_dtype(args)
    model, tok = generate_load(args.model, device=device, dtype=dtype)
    compiled = CompiledStep(model) if args.compile else None  # --compile
    report = Report()
    budget = model.config.max_position_embeddings - args.max_new_tokens
    if budget <= 0:
        raise SystemExit(
            f"--max-new-tokens {args.max_new_tokens} leaves no room for a prompt in the model's "
            f"context of {model.config.max_position_embeddings}"
        )
    seen, prompts = set(), []
    for f in args.data:
        for r in read(f, args.format, report=report, encoding=args.encoding):
            found = doctor_prompt(r)
            if found is None:
                report.skip("no real doctor's answer to compare with (distilled, or ends with the patient)", r["id"])
                continue
            messages, reference = found
            key = json.dumps(messages, ensure_ascii=False)
            if key in seen:  # deduplicate prompts, as the paper does
                continue
            seen.add(key)
            try:
                ids = render(tok, messages, max_len=budget).ids
            except ValueError:
                report.skip(f"question longer than the context less --max-new-tokens ({budget} tokens)", r["id"])
                continue
            prompts.append((r["id"], messages, reference, ids))
    prompts = prompts[: args.limit] if args.limit else prompts
    out = Path(args.out)
    claim_output(
        out,
        {
            "model": model_digest(args.model),
            "data": [file_digest(f) for f in args.data],
            "k": args.k,
            "max_new_tokens": args.max_new_tokens,
            "temperature": args.temperature,
            "top_p": args.top_p,
            "seed": args.seed,
            "dtype": str(dtype),
        },
        {"model": str(args.model), "data": [str(f) for f in args.data]},
        inputs=args.data,
    )
    done = finished_ids(out)
    todo = [p for p in prompts if p[0] not in done]
    gen = torch.Generator(device).manual_seed(args.seed)
    unfinished = 0
    with open(out, "a", encoding="utf-8") as f:
        for i in tqdm(range(0, len(todo), args.batch_size), desc="sample"):
            batch = todo[i : i + args.batch_size]
            res = generate(
                model,
                [ids for *_, ids in batch for _ in range(args.k)],
                max_new_tokens=args.max_new_tokens,
                eos_id=tok.eos_id,
                pad_id=tok.pad_id,
                temperature=args.temperature,
                top_p=args.top_p,
                vocab_limit=len(tok),
                generator=gen,
                compiled=compiled,
            )
            for j, (rid, messages, reference, _) in enumerate(batch):
                mine = slice(j * args.k, (j + 1) * args.k)
                unfinished += res.finished[mine].count(False)
                f.write(
                    json.dumps(
                        {
                            "id": rid,
                            "messages": messages,
                            "reference": reference,
                            "responses": [tok.decode(t).strip() for t in res.tokens[mine]],
                            "finished": res.finished[mine],
                        },
                        ensure_ascii=False,
                    )
                    + "\n"
                )
            f.flush()
    print(f"{len(todo)} prompts sampled ({len(prompts) - len(todo)} already done), {args.k} responses each: {out}")
    if unfinished:
        print(
            f"{unfinished} of {len(todo) * args.k} responses reached --max-new-tokens {args.max_new_tokens} "
            "without eos: marked unfinished, distill.py score does not rate them",
            file=sys.stderr,
        )
    if report:
        print(report.summary(), file=sys.stderr)


@torch.no_grad()
def score(args):
    """Print the reward of each conversation's final reply, a JSON line each. A record that
    does not end with a reply, or whose reply and question cannot fit the context, is skipped
    and counted on stderr."""
    device, dtype = device_and_dtype(args)
    rm = load_reward_model(args.model, dtype=dtype, device=device).eval()
    tok = Tokenizer(Path(args.model) / "tokenizer.model")
    report = Report()
    for f in args.data:
        for r in read(f, args.format, report=report, encoding=args.encoding):
            if r["messages"][-1]["role"] != "assistant":
                report.skip("no reply to score (ends with the patient)", r["id"])
                continue
            try:  # in the model's own prompt format (reward_config.json): ours, or the released model's
                ids = reward_ids(
                    tok,
                    r["messages"][:-1],
                    r["messages"][-1]["content"],
                    rm.prompt_format,
                    max_len=rm.config.max_position_embeddings,
                )
            except ValueError:
                report.skip("question + reply longer than the model's context", r["id"])
                continue
            tokens, mask = pad_batch([ids], tok.pad_id)
            reward = rm(tokens.to(device), mask.to(device)).item()
            print(json.dumps({"id": r["id"], "reward": round(reward, 6)}, ensure_ascii=False))
    if report:
        print(report.summary(), file=sys.stderr)


def arg_parser() -> argparse.ArgumentParser:
    """The training command line (plan.layout_defaults reads its defaults); `sample` and
    `score` have their own."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--model", required=True, help="the SFT checkpoint (HF layout), or 'tiny'")
    p.add_argument("--data", nargs="+", help="preference pairs (distill.py score output)")
    add_input_args(p, formats=False)
    add_trainer_args(
        p,
        unit="pairs",
        lr=LR,
        batch_size=BATCH_SIZE,
        epochs=EPOCHS,
        weight_decay=WEIGHT_DECAY,
        warmup_ratio=WARMUP_RATIO,
        grad_clip=GRAD_CLIP,
        max_len=MAX_LEN,
    )
    p.add_argument("--margin", type=FINITE, default=MARGIN)
    add_plan_args(p, items_help="pairs an epoch (default: 100 batches)")
    return p


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ("sample", "score"):
        p = argparse.ArgumentParser(prog=f"train_rm.py {argv[0]}")
        p.add_argument("--model", required=True)
        p.add_argument("--data", nargs="+", required=True)
        add_input_args(p)
        add_device_args(p, compile=argv[0] == "sample")
        if argv[0] == "sample":
            p.add_argument("--out", required=True)
            p.add_argument("-k", type=number(int, least=2), default=SAMPLES_PER_PROMPT)
            p.add_argument("--temperature", type=NONNEGATIVE, default=1.0)
            p.add_argument("--top-p", type=SHARE, default=0.9)
            p.add_argument("--max-new-tokens", type=COUNT, default=MAX_NEW_TOKENS)
            p.add_argument("--batch-size", type=COUNT, default=SAMPLE_BATCH_SIZE, help="prompts per generation batch")
            p.add_argument("--limit", type=COUNT)
            p.add_argument("--seed", type=int, default=0)
            return sample(p.parse_args(argv[1:]))
        return score(p.parse_args(argv[1:]))
    p = arg_parser()
    args = p.parse_args(argv)
    if args.dry_run:
        k = SAMPLES_PER_PROMPT  # what this file's `sample` holds on one GPU, beside evaluate.py
        sampling = (
            "train_rm.py sample",
            SAMPLE_BATCH_SIZE * k,
            MAX_NEW_TOKENS,
            f"--batch-size {SAMPLE_BATCH_SIZE} prompts x -k {k}",
        )
        return lm_dry_run(args, "rm", train_step, inference=(sampling,), settings=given_settings(p, args))
    if not (args.data and args.out):
        p.error("--data and --out are required (unless --dry-run)")
    run_distributed(_train, args)


if __name__ == "__main__":
    exit_trainer(main)
