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
a checkpoint is the trunk in the HF layout plus score_head.safetensors and reward_config.json.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load as load_safetensors, save as save_safetensors
from tqdm import tqdm

from data.mixing import LengthGroupedBatches, dedup_key
from data.readers import add_input_args, read
from data.schema import Report, claim_output, file_digest, finished_ids, model_digest, run_main
from data.template import render, render_reply
from generate import add_device_args, device_and_dtype, generate
from generate import load as generate_load
from model import Transformer
from tokenizer import Tokenizer
from plan import add_plan_args, lm_dry_run
from training import (HelpFormatter, add_trainer_args, eval_chunks, load_model, model_setup, run_distributed, run_setup, shard_and_load,
                      train_loop)

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
# fit one 80 GB GPU at 13B with the longest prompts (plan.py: 52.2 GiB); 8 x 4 did not (80.1 GiB:
# the KV cache alone is 50 GiB). Short prompts leave room for more.
SAMPLE_BATCH_SIZE = 4
# Paper §3.2: responses are rated "against responses from real doctors" on "authentic
# instructions and dialogues". ChatGPT's answers in the distilled parts are no doctor's.
DISTILLED_SOURCES = ("distilled_instruction", "distilled_conversation")


class RewardModel(nn.Module):
    """A LLaMA trunk and a scalar head read at the last real token (the reply's eos)."""

    def __init__(self, config):
        super().__init__()
        self.trunk = Transformer(config)
        self.trunk.lm_head.requires_grad_(False)  # kept for the HF layout, never used for rewards
        self.score_head = nn.Linear(config.hidden_size, 1, bias=False)

    @property
    def layers(self):
        return self.trunk.layers

    @property
    def config(self):
        return self.trunk.config

    def forward(self, tokens: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """tokens, attention_mask (B, T) -> rewards (B,), read at each row's last real token."""
        hidden = self.trunk(tokens, attention_mask, output="hidden")
        last = attention_mask.shape[1] - 1 - attention_mask.flip(-1).argmax(-1)  # left or right padding
        h = hidden[torch.arange(tokens.shape[0], device=tokens.device), last]
        return self.score_head(h)[:, 0].float().clone()  # a fresh tensor, not a view (FSDP hooks)

    def save_pretrained(self, path, *, tokenizer=None, state_dict=None, **kw):
        sd = self.state_dict() if state_dict is None else state_dict
        trunk = {k.removeprefix("trunk."): v for k, v in sd.items() if k.startswith("trunk.")}
        head = save_safetensors({"weight": sd["score_head.weight"].detach().cpu().contiguous()})
        meta = {"score_token": "the eos that ends the reply", "template": "data.template.render_reply"}
        self.trunk.save_pretrained(path, tokenizer=tokenizer, state_dict=trunk, extra_files={
            "score_head.safetensors": head, "reward_config.json": (json.dumps(meta, indent=2) + "\n").encode()})

    def scorer(self) -> "RewardModel":
        """This model without its LM head, which a score never reads (kept in a checkpoint for
        the HF layout): 0.4 GB less on every rank of PPO at 13B. It can score, not be saved."""
        if not self.config.tie_word_embeddings:
            self.trunk.lm_head = None
        return self

    def score_ids(self, prompts: list[list[int]], responses: list[list[int]], *, eos_id: int,
                  pad_id: int) -> torch.Tensor:
        """Rewards (B,) of responses given as token ids after their prompts' ids, exactly as the
        policy produced them. A response is scored at its eos, the token the head was trained
        to read. One without eos (cut off at max_new_tokens) gets one appended: it is scored as
        if it ended there, as a text reply always is (render_reply closes every reply with
        eos); whether to penalise it is the caller's choice, who knows it was cut (PPO does)."""
        device = next(self.parameters()).device
        seqs = [p + r + ([] if r and r[-1] == eos_id else [eos_id]) for p, r in zip(prompts, responses)]
        limit = self.config.max_position_embeddings
        if max(map(len, seqs)) > limit:
            raise ValueError(f"a prompt + response + eos of {max(map(len, seqs))} tokens exceeds the reward "
                             f"model's context of {limit}")
        tokens, mask = pad_batch(seqs, pad_id)
        return self(tokens.to(device), mask.to(device))

    @classmethod
    def from_pretrained(cls, path, dtype=torch.float32, device="cpu"):
        trunk = Transformer.from_pretrained(path, dtype=dtype, device=device)
        head_file = Path(path) / "score_head.safetensors"
        if not head_file.is_file():
            raise FileNotFoundError(f"{head_file}: not a reward model checkpoint (no score head)")
        with torch.device("meta"):
            rm = cls(trunk.config)
        rm.trunk = trunk
        rm.trunk.lm_head.requires_grad_(False)
        weight = load_safetensors(head_file.read_bytes())["weight"].to(dtype)
        if weight.shape != (1, trunk.config.hidden_size):
            raise ValueError(f"{head_file}: weight has shape {tuple(weight.shape)}, expected (1, {trunk.config.hidden_size})")
        rm.score_head = nn.Linear(trunk.config.hidden_size, 1, bias=False, dtype=dtype, device=device)
        rm.score_head.weight.data.copy_(weight)
        return rm


def pairwise_loss(chosen: torch.Tensor, rejected: torch.Tensor, margin: float = MARGIN) -> torch.Tensor:
    """-log σ(r_chosen − r_rejected − margin), per pair; log 2 when the two rewards are equal."""
    return -F.logsigmoid(chosen - rejected - margin)


def pad_batch(sequences: list[list[int]], pad_id: int, left: bool = False):
    """(tokens, attention_mask) for sequences of different lengths."""
    width = max(len(s) for s in sequences)
    tokens = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, s in enumerate(sequences):
        span = slice(width - len(s), width) if left else slice(0, len(s))
        tokens[i, span], mask[i, span] = torch.tensor(s), 1
    return tokens, mask


def pair_rewards(model, pairs: list[dict], pad_id: int, device):
    """Rewards of the chosen and the rejected replies of `pairs`, in one forward pass."""
    seqs = [p["chosen_ids"] for p in pairs] + [p["rejected_ids"] for p in pairs]
    tokens, mask = pad_batch(seqs, pad_id)
    r = model(tokens.to(device), mask.to(device))
    return r[: len(pairs)], r[len(pairs):]


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
    """Pairwise accuracy (r_chosen > r_rejected, ties half) and mean margin, over all ranks."""
    model.eval()
    correct = margin = 0.0
    for chunk, real in eval_chunks(pairs, d, micro):
        c, r = pair_rewards(model, chunk, pad_id, d.device)
        if real:  # a tie counts half: a model with no preference scores chance, 0.5
            correct += ((c > r).float() + 0.5 * (c == r).float()).sum().item()
            margin += (c - r).sum().item()
    model.train()
    n = len(pairs)
    return {"accuracy": d.all_sum(correct) / n, "margin": d.all_sum(margin) / n}


def _train(args, d):
    out = args.out
    trunk, read_weights, tok = load_model(args.model, out, d, seed=args.seed)
    max_len = args.max_len or min(MAX_LEN, trunk.config.max_position_embeddings)
    if max_len > trunk.config.max_position_embeddings:
        raise SystemExit(f"--max-len {max_len} exceeds the model's context of {trunk.config.max_position_embeddings}")

    report = Report()
    records = [r for f in args.data for r in read(f, "pairs", report=report, encoding=args.encoding)]
    train_records, val_records = split_by_prompt(records, 0 if args.val_data else VAL_FRACTION, args.seed)
    if args.val_data:
        val_records = [r for f in args.val_data for r in read(f, "pairs", report=report, encoding=args.encoding)]
    train_pairs = encode_pairs(train_records, tok, max_len, report)
    val_pairs = encode_pairs(val_records, tok, max_len, report)
    sampler = LengthGroupedBatches([len(p["chosen_ids"]) + len(p["rejected_ids"]) for p in train_pairs],
                                   args.batch_size, seed=args.seed, drop_last=True)
    if len(sampler) == 0:
        raise SystemExit(f"{len(train_pairs)} training pairs make no full batch of {args.batch_size}")
    if d.main:
        print(f"{len(train_pairs)} training / {len(val_pairs)} validation pairs (split by prompt); "
              f"{len(sampler)} steps an epoch; {d.world} rank(s)")
        if report:
            print(report.summary())

    # The trunk comes from the SFT model; the head starts at zero, so every reward starts at 0
    # and the first loss is exactly log 2: the model begins with no preference.
    with torch.device("meta"):
        model = RewardModel(trunk.config)
    model.trunk.activation_checkpointing = args.activation_checkpointing
    full = None
    if d.main:
        full = {f"trunk.{k}": v for k, v in read_weights().items()}
        full["score_head.weight"] = torch.zeros(1, trunk.config.hidden_size)
    model = shard_and_load(model, full, d, bf16=d.device.type == "cuda" and not args.fp32)
    del full
    model.train()

    def loss_sum(chunk):
        return pairs_loss(model, [train_pairs[i] for i in chunk], tok.pad_id, d.device, args.margin)

    def validate():
        if not val_pairs:
            return {}
        v = validate_pairs(model, val_pairs, d, args.micro_batch_size, tok.pad_id)
        return {"val_accuracy": v["accuracy"], "val_margin": v["margin"]}

    train_loop(args, d, model, tok, name="rm", sampler=sampler, loss_sum=loss_sum, n_units=len,
               n_tokens=lambda batch: sum(len(train_pairs[i]["chosen_ids"]) + len(train_pairs[i]["rejected_ids"])
                                          for i in batch),
               validate=validate, score=lambda m: (m["val_accuracy"], m["val_margin"]),  # accuracy, then margin
               describe=lambda m: f"held-out accuracy {m['val_accuracy']:.3f}, mean margin {m['val_margin']:.3f}",
               setup=run_setup(args, model=model_setup(args.model), margin=args.margin))


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
    model, tok = generate_load(args.model, device=device, dtype=dtype, compile=args.compile)
    report = Report()
    budget = model.config.max_position_embeddings - args.max_new_tokens
    if budget <= 0:
        raise SystemExit(f"--max-new-tokens {args.max_new_tokens} leaves no room for a prompt in the model's "
                         f"context of {model.config.max_position_embeddings}")
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
    claim_output(out, {"model": model_digest(args.model), "data": [file_digest(f) for f in args.data], "k": args.k,
                       "max_new_tokens": args.max_new_tokens, "temperature": args.temperature, "top_p": args.top_p,
                       "seed": args.seed, "dtype": str(dtype)},
                 {"model": str(args.model), "data": [str(f) for f in args.data]})
    done = finished_ids(out)
    todo = [p for p in prompts if p[0] not in done]
    gen = torch.Generator(device).manual_seed(args.seed)
    unfinished = 0
    with open(out, "a", encoding="utf-8") as f:
        for i in tqdm(range(0, len(todo), args.batch_size), desc="sample"):
            batch = todo[i:i + args.batch_size]
            res = generate(model, [ids for *_, ids in batch for _ in range(args.k)], max_new_tokens=args.max_new_tokens,
                           eos_id=tok.eos_id, pad_id=tok.pad_id, temperature=args.temperature, top_p=args.top_p,
                           vocab_limit=len(tok), generator=gen)
            for j, (rid, messages, reference, _) in enumerate(batch):
                mine = slice(j * args.k, (j + 1) * args.k)
                unfinished += res.finished[mine].count(False)
                f.write(json.dumps({"id": rid, "messages": messages, "reference": reference,
                                    "responses": [tok.decode(t).strip() for t in res.tokens[mine]],
                                    "finished": res.finished[mine]}, ensure_ascii=False) + "\n")
            f.flush()
    print(f"{len(todo)} prompts sampled ({len(prompts) - len(todo)} already done), {args.k} responses each: {out}")
    if unfinished:
        print(f"{unfinished} of {len(todo) * args.k} responses reached --max-new-tokens {args.max_new_tokens} "
              "without eos: marked unfinished, distill.py score does not rate them", file=sys.stderr)
    if report:
        print(report.summary(), file=sys.stderr)


@torch.no_grad()
def score(args):
    """Print the reward of each conversation's final reply, a JSON line each. A record that
    does not end with a reply, or whose reply and question cannot fit the context, is skipped
    and counted on stderr."""
    device, dtype = device_and_dtype(args)
    rm = RewardModel.from_pretrained(args.model, dtype=dtype, device=device).eval()
    tok = Tokenizer(Path(args.model) / "tokenizer.model")
    report = Report()
    for f in args.data:
        for r in read(f, args.format, report=report, encoding=args.encoding):
            if r["messages"][-1]["role"] != "assistant":
                report.skip("no reply to score (ends with the patient)", r["id"])
                continue
            try:
                ids, _ = render_reply(tok, r["messages"][:-1], r["messages"][-1]["content"],
                                      max_len=rm.config.max_position_embeddings)
            except ValueError:
                report.skip("question + reply longer than the model's context", r["id"])
                continue
            tokens, mask = pad_batch([ids], tok.pad_id)
            reward = rm(tokens.to(device), mask.to(device)).item()
            print(json.dumps({"id": r["id"], "reward": round(reward, 6)}, ensure_ascii=False))
    if report:
        print(report.summary(), file=sys.stderr)


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
            p.add_argument("-k", type=int, default=SAMPLES_PER_PROMPT)
            p.add_argument("--temperature", type=float, default=1.0)
            p.add_argument("--top-p", type=float, default=0.9)
            p.add_argument("--max-new-tokens", type=int, default=MAX_NEW_TOKENS)
            p.add_argument("--batch-size", type=int, default=SAMPLE_BATCH_SIZE, help="prompts per generation batch")
            p.add_argument("--limit", type=int)
            p.add_argument("--seed", type=int, default=0)
            return sample(p.parse_args(argv[1:]))
        return score(p.parse_args(argv[1:]))
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--model", required=True, help="the SFT checkpoint (HF layout), or 'tiny'")
    p.add_argument("--data", nargs="+", help="preference pairs (distill.py score output)")
    add_input_args(p, formats=False)
    add_trainer_args(p, unit="pairs", lr=LR, batch_size=BATCH_SIZE, epochs=EPOCHS, weight_decay=WEIGHT_DECAY,
                     warmup_ratio=WARMUP_RATIO, grad_clip=GRAD_CLIP, max_len=MAX_LEN)
    p.add_argument("--margin", type=float, default=MARGIN)
    add_plan_args(p, items_help="pairs an epoch (default: 100 batches)")
    args = p.parse_args(argv)
    if args.dry_run:
        return lm_dry_run(args, "rm")
    if not (args.data and args.out):
        p.error("--data and --out are required (unless --dry-run)")
    run_distributed(_train, args)


if __name__ == "__main__":
    sys.exit(run_main(main))
