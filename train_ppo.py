"""RLMF, the paper's reinforcement learning (§3.2, App. E): PPO on the SFT policy, with the
reward model's score and a per-token KL penalty against the SFT policy, only the last two
transformer blocks trained. FSDP on 1 to N ranks.

    # the embedded default, after quickstart.py (SFT and reward model), on a laptop CPU
    python train_ppo.py --policy runs/quickstart/sft/best --reward runs/quickstart/rm/best \
        --data data/sft/*.jsonl --exclude data/preference/preference_pairs.jsonl --out runs/ppo \
        --max-steps 16 --rollout-size 16 --chunk-size 8 --batch-size 8 --max-new-tokens 32 --lr 1e-4
    # the paper's run: Ziya-LLaMA-13B SFT policy and reward model, 8 GPUs
    torchrun --nproc_per_node 8 train_ppo.py --policy runs/sft-13b/best --reward runs/rm-13b/best \
        --data sft_mix/train.jsonl --exclude preference/pairs.jsonl --out runs/ppo-13b
    # will it fit, and how long? per-rank memory (--simulate: measured, plan.py) and the hours
    python train_ppo.py --policy ziya-13b --dry-run --world-size 8 [--simulate]
    # within 40 GiB a rank on 8 GPUs: each block gathered at every decoding step (slower)
    torchrun --nproc_per_node 8 train_ppo.py ... --reshard-in-rollout

One round, as trlx ran it when the paper appeared (commit 355c974; HuatuoGPT used trlx and the
paper names its settings as trlx does; where we differ, the code says so):

1. rollout: --rollout-size prompts (64), generated --chunk-size (8) at a time with the KV
   cache, sampled from the policy itself (temperature 1, no top-p: PPO's ratio assumes the
   samples come from π); each rank generates its share; the reward model scores each (it is
   sharded over the ranks like the policy, --reward-placement: a rank holds its share).
2. experience (make_experience): the round is shuffled once into minibatches of --batch-size;
   each rank keeps the frozen bottom's output of the experiences in its micro-batches of them
   (see "the shared trunk" below), and one forward of the top in those very micro-batches gives
   the old log-probs and values, the reference top π0's log-probs. Per token, r_t = −λ_KL ·
   (log π(y_t) − log π0(y_t)), plus the clipped score at the last token. Advantages by GAE
   (γ = 1, λ = 0.95), whitened over the round; returns = advantages + values.
3. update: each minibatch in turn takes --ppo-epochs (4) optimizer steps in a row (what
   --max-steps, the paper's 16,000, counts; a run stops at exactly that). Loss per response
   token: the clipped surrogate (ε = 0.2) plus vf_coef (1) times the clipped value loss (0.2),
   averaged over the minibatch's response tokens. After each minibatch's steps the adaptive KL
   controller (Ziegler et al. 2019) moves λ_KL towards --kl-target.

The shared trunk. Only the last two blocks (and the final norm and the LM head, as trlx
unfreezes an untied head) train; the embedding and the blocks below never change, so on any
input they compute the same residual stream under π and under π0, and in every update of a
round. The bottom therefore runs once per experience, without gradients, its output is kept for
the round, and every forward of the round starts from it: the trainable top for π and the value
head, a frozen copy of the SFT top for π0, every update step. That is exact, not an
approximation: π0 costs two blocks and a head instead of a whole second model, and an update
two blocks instead of all of them (bench/bench_ppo.py).

Outputs in --out: metrics.jsonl (one record per round), state/ (resumable: weights, optimizer,
KL coefficient, prompt position, RNG), final/ (the policy in the HF layout, value_head.safetensors
beside it).
"""

from __future__ import annotations

import argparse
import contextlib
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.fsdp import FSDPModule
from tqdm import tqdm

from data.readers import add_input_args
from data.schema import Report
from data.template import pad_batch
from generate import generate
from model import token_logprobs
from pretrained import load_config
from plan import PPOParts, add_plan_args, given_settings, ppo_dry_run
from ppo_setup import (
    RolloutSettings,
    RoundSettings,
    UpdateSettings,
    TRAINABLE_BLOCKS,
    Prompts,
    PromptStream,
    TextReward,
    build,
    build_empty,
    load_reward,
    prompt_budget,
    prompt_parts,
    reward_by_text,
    reward_empty,
    reward_scorer,
)
from safety import COUNT, NONNEGATIVE, POSITIVE, data_digests, file_digest, model_fingerprint, run_fingerprint
from training import (
    HelpFormatter,
    Run,
    Timer,
    add_run_args,
    card_writer,
    grad_norm_and_clip,
    load_model,
    make_optimizer,
    micro_batches,
    rendered_once,
    save_dtype,
    save_hf,
)
from distributed import device_mesh, exit_trainer, gathered, mixed_precision, run_distributed

# Paper §3.2 and App. E.
LR = 1e-6  # "learning rate 1e-6"
MAX_STEPS = 16_000  # "16,000 steps"
ROLLOUT_SIZE = 64  # "rollout size 64": experiences collected before each round of updates
CHUNK_SIZE = 8  # "chunk size 8": prompts generated together (trlx's chunk_size), and nothing else
PPO_EPOCHS = 4  # "4 PPO epochs" over each rollout
INIT_KL_COEF = 0.1  # "the initial KL divergence coefficient is set at 0.1"
# Where the paper is silent: trlx (CarperAI/trlx), which HuatuoGPT used, as it stood when the
# paper appeared: main at commit 355c974 (11 May 2023), its last before the paper (24 May).
TRLX_COMMIT = "355c974"
GAMMA = 1.0  # PPOConfig gamma and lam (GAE), in default_ppo_config and the examples
LAM = 0.95
CLIP_RATIO = 0.2  # cliprange: PPO's ε
CLIP_VALUE = 0.2  # cliprange_value: value-loss clipping around the old values
VF_COEF = 1.0  # vf_coef
SCORE_CLIP = 10.0  # cliprange_reward: the reward model's score is clipped to ±10
# AdamW as default_ppo_config (trlx/data/default_configs.py) sets it: betas (0.9, 0.95), eps 1e-8
# (torch's default too), weight decay 1e-6 (our one change: not on norm gains, make_optimizer).
BETAS = (0.9, 0.95)
WEIGHT_DECAY = 1e-6
# The paper's "initial" KL coefficient implies an adaptive one, and PPOConfig has no defaults:
# the target and horizon are those of trlx's example for a model of this size
# (examples/hh/ppo_hh.py, GPT-J 6B: target 6, horizon 10,000); default_ppo_config keeps λ fixed
# (target None). --kl-target none does that.
KL_TARGET = 6.0  # nats per sequence
KL_HORIZON = 10_000
# Silent in both: ours.
BATCH_SIZE = 16  # experiences per minibatch (optimizer step): 64 / 16 x 4 epochs = 16 steps a round,
#                  so 16,000 steps = 1,000 rounds = 64,000 experiences (global: see README)
MAX_NEW_TOKENS = 256
GRAD_CLIP = 1.0  # the SFT recipe's
UNFINISHED_PENALTY = 0.0  # subtracted from the score of a response cut at --max-new-tokens (see score_round)
# Two batches that --chunk-size also set before, each its own setting now, at the value the
# default --chunk-size gave them: a run with the default settings computes what it did.
SCORE_BATCH_SIZE = 8  # sequences the reward model scores in one forward (score_round)
BOTTOM_BATCH_SIZE = 8  # experiences the frozen bottom runs on in one forward (make_experience)


# -- the algorithm, as plain functions (each tested by hand) -----------------------------------------


def per_token_rewards(logp: torch.Tensor, ref_logp: torch.Tensor, score: float, kl_coef: float) -> torch.Tensor:
    """r_t = −λ_KL · (log π(y_t) − log π0(y_t)) for each response token, plus the score at the
    last one (paper §3.2; Ziegler et al. 2019; trlx)."""
    rewards = -kl_coef * (logp - ref_logp)
    rewards[-1] += score
    return rewards


def gae(rewards: torch.Tensor, values: torch.Tensor, gamma: float = GAMMA, lam: float = LAM):
    """(advantages, returns) of one response by generalised advantage estimation: δ_t = r_t +
    γ V_{t+1} − V_t (V after the last token is 0: the episode ends), A_t = δ_t + γλ A_{t+1}."""
    adv = torch.zeros_like(rewards)
    running = 0.0
    for t in reversed(range(len(rewards))):
        following = values[t + 1] if t + 1 < len(rewards) else 0.0
        running = rewards[t] + gamma * following - values[t] + gamma * lam * running
        adv[t] = running
    return adv, adv + values


def whiten(x: torch.Tensor, eps: float = 1e-8, sums: torch.Tensor | None = None) -> torch.Tensor:
    """Zero mean, unit variance (the unbiased variance, as trlx's whiten does on one process).
    sums: (Σx, Σx², n) over every rank's values when x is one rank's share of them."""
    if sums is None:
        return (x - x.mean()) * torch.rsqrt(x.var() + eps)
    total, squares, n = sums
    mean = total / n
    return (x - mean) * torch.rsqrt((squares - n * mean * mean) / (n - 1).clamp(min=1) + eps)


def ppo_loss_sum(
    logp,
    old_logp,
    values,
    old_values,
    adv,
    returns,
    mask,
    *,
    clip: float = CLIP_RATIO,
    clip_value: float = CLIP_VALUE,
    vf_coef: float = VF_COEF,
):
    """Summed over the response tokens (mask) of a micro-batch: the clipped surrogate
    max(−A·ρ, −A·clip(ρ, 1 ± ε)) and vf_coef · ½ max((V − R)², (clip(V, V_old ± ε_v) − R)²).
    Returns (loss sum, {statistic: sum}) — the caller divides by the minibatch's token count."""
    mask = mask.to(logp.dtype)
    log_ratio = (logp - old_logp) * mask
    ratio = torch.exp(log_ratio)
    pg = torch.max(-adv * ratio, -adv * torch.clamp(ratio, 1 - clip, 1 + clip))
    clipped_values = torch.clamp(values, old_values - clip_value, old_values + clip_value)
    vf = 0.5 * torch.max((values - returns) ** 2, (clipped_values - returns) ** 2)
    pg_sum, vf_sum = (pg * mask).sum(), (vf * mask).sum()
    with torch.no_grad():  # tensors: read once a round (float()), not synchronised every micro-batch
        stats = {
            "policy_loss": pg_sum.detach(),
            "value_loss": vf_sum.detach(),
            "clip_fraction": (((ratio - 1).abs() > clip).to(mask.dtype) * mask).sum(),
            "approx_kl": (((ratio - 1) - log_ratio) * mask).sum(),
        }
    return pg_sum + vf_coef * vf_sum, stats


class AdaptiveKL:
    """Ziegler et al. 2019's controller, as trlx applies it: λ ← λ · (1 + clip(KL/target − 1,
    ±0.2) · n/horizon), n the batch size, called after each minibatch's --ppo-epochs steps
    (update). target None: λ stays fixed."""

    def __init__(self, value: float, target: float | None, horizon: int):
        self.value, self.target, self.horizon = value, target, horizon

    def update(self, kl: float, n_steps: int):
        if self.target is not None:
            error = min(max(kl / self.target - 1, -0.2), 0.2)
            self.value *= 1 + error * n_steps / self.horizon


# -- experiences ------------------------------------------------------------------------------------------


@dataclass
class Experience:
    prompt: list[int]
    response: list[int]
    finished: bool  # ended with eos before --max-new-tokens
    score: float = 0.0  # the reward model's, clipped, penalty included
    messages: list | None = None  # the prompt's conversation, for a reward model scored through text
    reward_cut: bool = False  # its text did not fit the reward model's context and was cut (TextReward)
    # Filled by make_experience on the rank whose micro-batches hold this experience, and only there:
    bottom_out: torch.Tensor | None = None  # the frozen bottom's output at its prompt + response positions
    logp: torch.Tensor | None = None  # old log π(y_t), one per response token
    ref_logp: torch.Tensor | None = None  # log π0(y_t)
    values: torch.Tensor | None = None  # V(s_t) before each response token
    advantages: torch.Tensor | None = None
    returns: torch.Tensor | None = None


def batch_tensors(exps: list[Experience], pad_id: int, device):
    """Prompts left-padded and responses right-padded to the micro-batch's widths: (tokens,
    mask, P, R). The response of row i is tokens[i, P:P + len]; position P − 1 + t predicts its
    t-th token and holds V(s_t)."""
    prompts, prompt_mask = pad_batch([e.prompt for e in exps], pad_id, left=True)
    responses, response_mask = pad_batch([e.response for e in exps], pad_id)
    tokens, mask = torch.cat([prompts, responses], 1), torch.cat([prompt_mask, response_mask], 1)
    return tokens.to(device), mask.to(device), prompts.shape[1], responses.shape[1]


@torch.no_grad()
def keep_bottom_out(model, exps: list[Experience], pad_id: int, device):
    """The frozen bottom's output for each experience, kept with it (e.bottom_out: its prompt +
    response positions, on the device). The embedding and the blocks below first_trainable never
    change within a run, and the bottom runs without dropout or gradients, so this is what every
    update of the round would compute again (74-93% of an update step at Ziya's split): it is
    computed once, here, in batches of any size (their padding changes nothing at the real
    positions), and every forward of the round starts from it (response_outputs)."""
    tokens, mask, P, _ = batch_tensors(exps, pad_id, device)
    hidden = model.bottom(tokens, mask)
    for row, e in enumerate(exps):
        e.bottom_out = hidden[row, P - len(e.prompt) : P + len(e.response)].clone()


def response_outputs(model, exps, pad_id, device, *, ref=None, vocab: int | None = None):
    """One forward of a micro-batch through the trainable top on the kept bottom output (keep_bottom_out),
    or, for experiences without one, through the shared bottom first (no gradient): per response
    position, (log π, values, response mask, [log π0, entropy]). The top runs with gradients when
    they are enabled (training), without in the experience pass: the same operations on the same
    inputs, so the two agree bit for bit.

    vocab: the tokenizer's size. π and π0 are distributions over the ids the tokenizer has: an
    embedding can have more rows (Ziya's 14, the embedded default's 2,048), which the rollout
    never samples (generate's vocab_limit), so every log-probability PPO uses (the old and new
    log π of the ratio, log π0 of the KL penalty, the entropy) is over those first `vocab` ids,
    renormalised, the very distribution the responses were drawn from (docs/ppo.md)."""
    tokens, mask, P, R = batch_tensors(exps, pad_id, device)
    if all(e.bottom_out is not None for e in exps):
        # The kept rows at their positions in this micro-batch's layout; zeros where it pads
        # (masked: no real position sees them).
        hidden = exps[0].bottom_out.new_zeros(len(exps), P + R, exps[0].bottom_out.shape[-1])
        for row, e in enumerate(exps):
            hidden[row, P - len(e.prompt) : P + len(e.response)] = e.bottom_out
    else:
        with torch.no_grad():
            hidden = model.bottom(tokens, mask)
    # Only the positions that predict a response token reach the final norm and the heads.
    span = slice(P - 1, P + R - 1)
    logits, values = model.top(hidden, mask, positions=span)
    logits = logits[..., :vocab]
    targets = tokens[:, P : P + R]
    out = {"logp": token_logprobs(logits, targets), "values": values.float(), "mask": mask[:, P : P + R]}
    if ref is not None:
        with torch.no_grad():
            ref_logits = ref(hidden=hidden.to(next(ref.parameters()).dtype), attention_mask=mask, positions=span)
            ref_logits = ref_logits[..., :vocab]
            out["ref_logp"] = token_logprobs(ref_logits, targets)
            lp = torch.log_softmax(logits.float(), -1)
            out["entropy"] = -(lp.exp() * lp).sum(-1)
    return out


# -- one round --------------------------------------------------------------------------------------------


def rollout(model, rm, prompts, tok, s: RolloutSettings, d, round_no: int) -> tuple[list[Experience], dict]:
    """Generate this rank's share of the round's prompts (generate_round) and score it; every
    rank ends with the whole round, in the order of `prompts`. Returns (experiences,
    {"generate_s", "score_s": seconds spent, "idle_rows": the share of this rank's decoding
    rows that had no prompt left to run})."""
    t0 = time.perf_counter()
    exps, idle = generate_round(model, prompts, tok, s, d, round_no)
    t1 = time.perf_counter()
    score_round(rm, exps, tok, batch_size=s.score_batch_size, unfinished_penalty=s.unfinished_penalty)
    seconds = {"generate_s": t1 - t0, "score_s": time.perf_counter() - t1, "idle_rows": idle}
    ordered = d.all_gather_list([(d.rank + d.world * i, e) for i, e in enumerate(exps)])
    return [e for _, e in sorted(ordered, key=lambda x: x[0])], seconds


def generate_round(
    model, prompts, tok, s: RolloutSettings, d, round_no: int, readback=None
) -> tuple[list[Experience], float]:
    """This rank's share of the round's prompts sampled, --chunk-size rows at a time through a
    queue (generate.decode_steps: a row whose response ended takes the next prompt), from the
    tokenizer's ids; the policy stays gathered for the whole generation unless
    --reshard-in-rollout. -> (this rank's experiences, unscored; the share of its decoding rows
    that had no prompt to run). simulate.measure_ppo runs this very function on fake tensors
    (readback: see generate.decode_steps)."""
    mine = prompts[d.rank :: d.world]
    # A generator per prompt, seeded by the run's seed, the round and the prompt's place in it:
    # its response is the same on any number of ranks and whatever prompts share its steps.
    generators = [
        torch.Generator(d.device).manual_seed(hash((s.seed, round_no, i)) % 2**63)
        for i in range(d.rank, len(prompts), d.world)
    ]
    model.eval()
    with contextlib.nullcontext() if s.reshard_in_rollout else gathered(model):
        out = generate(
            model,
            mine,
            rows=s.chunk_size,
            generator=generators,
            max_new_tokens=s.max_new_tokens,
            eos_id=tok.eos_id,
            pad_id=tok.pad_id,
            temperature=1.0,
            vocab_limit=len(tok),
            readback=readback,
        )
    model.train()
    return [
        Experience(list(p), r, f, messages=getattr(p, "messages", None))
        for p, r, f in zip(mine, out.tokens, out.finished)
    ], out.idle_rows


@torch.no_grad()
def score_round(rm, exps: list[Experience], tok, *, batch_size: int, unfinished_penalty: float = UNFINISHED_PENALTY):
    """The reward model's score of each response, clipped to ±SCORE_CLIP. A response cut off at
    --max-new-tokens is scored with an eos put after it (score_ids): our choice, as the reward
    model was trained to read its score at the eos that closes a reply (trlx decodes a cut
    response and scores its text as it is, with no eos). --unfinished-penalty (0 by default; a
    positive number, as TRL's missing_eos_penalty) is subtracted from it, and how many were cut
    is reported."""
    for c in range(0, len(exps), batch_size):
        chunk = exps[c : c + batch_size]
        if isinstance(rm, TextReward):
            scores = rm.score(chunk)
        else:
            scores = rm.score_ids(
                [e.prompt for e in chunk], [e.response for e in chunk], eos_id=tok.eos_id, pad_id=tok.pad_id
            )
        for e, s in zip(chunk, scores.tolist()):
            e.score = max(-SCORE_CLIP, min(SCORE_CLIP, s)) - (0.0 if e.finished else unfinished_penalty)
    module = rm.module if isinstance(rm, TextReward) else rm
    if isinstance(module, FSDPModule):
        module.reshard()  # after forwards without gradients FSDP keeps the root gathered (see generate.py)


def minibatches(n: int, batch_size: int, seed: int, round_no: int) -> list[list[int]]:
    """The round's minibatches: its n experiences shuffled once (by seed and round) and cut into
    --batch-size. Each takes --ppo-epochs optimizer steps in a row (update)."""
    order = list(range(n))
    random.Random(f"{seed}:{round_no}").shuffle(order)
    return [order[i : i + batch_size] for i in range(0, n, batch_size)]


def make_experience(
    model,
    ref,
    exps: list[Experience],
    batches: list[list[int]],
    tok,
    d,
    kl_coef: float,
    *,
    micro_batch_size: int,
    bottom_batch_size: int = BOTTOM_BATCH_SIZE,
    recompute_bottom: bool = False,
) -> dict:
    """This rank's experiences of the round, the ones in its micro-batches of `batches` (it
    updates on those, and only those, in every epoch: a minibatch keeps its micro-batches):
    the frozen bottom's output once (keep_bottom_out, in batches of --bottom-batch-size), then old log-probs, values,
    π0's log-probs and entropy in the very micro-batches the updates use (so the first step's
    ratio is exactly 1); per-token rewards, GAE, and advantages whitened over the round's
    response tokens on all ranks. -> the round's sums {kl, entropy, tokens} over all ranks (0-d
    tensors, read once a round by the caller: nothing here waits for the device).
    recompute_bottom: keep no output of the bottom (each forward runs the bottom again), for
    tests and bench/bench_ppo.py."""
    model.eval()
    micros = [micro for batch in batches for micro in micro_batches(batch, d, micro_batch_size)]
    mine = [i for micro in micros for i in micro]
    if not recompute_bottom:
        for c in range(0, len(mine), bottom_batch_size):
            keep_bottom_out(model, [exps[i] for i in mine[c : c + bottom_batch_size]], tok.pad_id, d.device)
    # The round's sums, one tensor so that one all-reduce adds them over the ranks.
    fields = ("kl", "entropy", "tokens", "advantages", "advantages_squared")
    sums = torch.zeros(len(fields), dtype=torch.float64, device=d.device)
    with torch.no_grad():
        for micro in micros:
            out = response_outputs(model, [exps[i] for i in micro], tok.pad_id, d.device, ref=ref, vocab=len(tok))
            for row, i in enumerate(micro):
                e, n = exps[i], len(exps[i].response)
                e.logp, e.ref_logp, e.values = out["logp"][row, :n], out["ref_logp"][row, :n], out["values"][row, :n]
                rewards = per_token_rewards(e.logp.double(), e.ref_logp.double(), e.score, kl_coef)
                e.advantages, e.returns = gae(rewards, e.values.double())
                sums += torch.stack(
                    [
                        (e.logp - e.ref_logp).sum().double(),
                        out["entropy"][row, :n].sum().double(),
                        torch.tensor(float(n), device=d.device, dtype=torch.float64),
                        e.advantages.sum(),
                        (e.advantages**2).sum(),
                    ]
                )
    model.reshard()  # after forwards without gradients FSDP keeps the root gathered (see generate.py)
    model.train()
    dist.all_reduce(sums)  # tensors, as every collective here: nothing of the round is pickled
    total = dict(zip(fields, sums))
    moments = torch.stack([total["advantages"], total["advantages_squared"], total["tokens"]])
    for i in mine:  # whitened over the round's response tokens on all ranks
        e = exps[i]
        e.advantages = whiten(e.advantages, sums=moments).to(e.logp.dtype)
        e.returns = e.returns.to(e.logp.dtype)
    return {k: total[k] for k in ("kl", "entropy", "tokens")}  # read once a round, by the caller


def update(
    model,
    opt,
    kl_ctl: "AdaptiveKL",
    exps: list[Experience],
    batches: list[list[int]],
    tok,
    s: UpdateSettings,
    d,
    mean_kl: float,
    steps: int,
    check=None,
) -> dict:
    """At most `steps` optimizer steps over the round, in trlx's order (AccelerateRLTrainer.learn
    and AcceleratePPOTrainer.post_backward_callback at trlx 355c974): each minibatch takes
    --ppo-epochs steps in a row, then the KL controller moves λ by the round's mean KL with
    n_steps = --batch-size. A run stops within a round at exactly --max-steps, as trlx stops at
    its total_steps, before that minibatch's controller update. check(k, loss, grad_norm), when
    given, runs before the round's k-th update (1-based; the run's step guard). Returns the statistics, each a
    mean over the response tokens of the steps made."""
    totals, tokens_seen, done = {}, 0, 0

    def stats() -> dict:
        out = {k: d.all_sum(float(v)) / max(tokens_seen, 1) for k, v in totals.items()}
        return dict(out, steps=done, tokens=tokens_seen)

    for batch in batches:
        for _ in range(s.ppo_epochs):
            if done == steps:
                return stats()
            guard = check and (lambda loss, norm: check(done + 1, loss, norm))
            tokens_seen += update_step(model, opt, exps, batch, tok, s, d, totals, guard)
            done += 1
        kl_ctl.update(mean_kl, s.batch_size)
    return stats()


def update_step(
    model, opt, exps: list[Experience], batch: list[int], tok, s: UpdateSettings, d, totals: dict, check=None
) -> int:
    """One optimizer step on the minibatch `batch` (indices into exps): the PPO loss of its
    response tokens, micro-batch by micro-batch on this rank's share, then the clip,
    check(loss, grad_norm) when given (the step guard: the minibatch's loss over all ranks, the
    same on each) and the step. Adds the loss statistics (sums, tensors) to `totals`; returns the
    minibatch's response tokens (on all ranks: every rank knows the whole round)."""
    n_tokens = sum(len(exps[i].response) for i in batch)
    chunks = micro_batches(batch, d, s.micro_batch_size)
    losses = torch.zeros((), dtype=torch.float64, device=d.device)
    for k, chunk in enumerate(chunks):
        # --grad-sync every: reduce-scatter each micro-batch's gradient at once (train_sft.train_step).
        model.set_requires_gradient_sync(s.grad_sync == "every" or k == len(chunks) - 1)
        mine = [exps[i] for i in chunk]
        out = response_outputs(model, mine, tok.pad_id, d.device, vocab=len(tok))  # the top on the kept bottom output
        width = out["logp"].shape[1]
        old = {
            name: torch.stack([nn.functional.pad(getattr(e, name), (0, width - len(e.response))) for e in mine])
            for name in ("logp", "values", "advantages", "returns")
        }  # the experience pass's, padded alike
        loss_sum, stats = ppo_loss_sum(
            out["logp"],
            old["logp"],
            out["values"],
            old["values"],
            old["advantages"],
            old["returns"],
            out["mask"],
            clip=s.clip_ratio,
            clip_value=s.clip_value,
            vf_coef=s.vf_coef,
        )
        # FSDP averages gradients over ranks; scaling by the world size makes that a sum, so the
        # gradient is that of (summed token losses) / (response tokens of the whole minibatch):
        # 1 rank and N ranks take the same step.
        (loss_sum * d.world / n_tokens).backward()
        losses += loss_sum.detach().double()
        for name, v in stats.items():
            totals[name] = totals.get(name, 0.0) + v
    grad_norm = grad_norm_and_clip(model, s.grad_clip)
    if check:  # before the update, on every rank alike
        check(d.all_sum(float(losses)) / n_tokens, float(grad_norm))
    opt.step()
    opt.zero_grad(set_to_none=True)
    return n_tokens


# -- the run ---------------------------------------------------------------------------------------------


def check_setup(args, config, tok):
    """The reward model's config (its weights come later) and how it scores, the blocks to
    train and the prompt budget, checked before any data or weight is read -> (reward_config,
    by_text: why the reward model scores through text, or None, budget)."""
    reward_config = load_config(args.reward, builtin=False)
    by_text = reward_by_text(args.reward, tok)  # its tokenizer and format, from its checkpoint
    if by_text is None and reward_config.vocab_size != config.vocab_size:
        raise SystemExit(
            f"--reward {args.reward} has a vocabulary of {reward_config.vocab_size}, the policy "
            f"{config.vocab_size}, and no tokenizer.model of its own: it must share the policy's tokenizer"
        )
    if not 1 <= args.trainable_blocks <= config.num_hidden_layers:
        raise SystemExit(f"--trainable-blocks {args.trainable_blocks}: the model has {config.num_hidden_layers} blocks")
    # Through text, the reward model counts its own tokens (TextReward fits them): only the policy's bound here.
    budget = prompt_budget(config, None if by_text else reward_config, args.max_new_tokens)
    if budget <= 0:
        raise SystemExit(
            f"--max-new-tokens {args.max_new_tokens} leaves no room for a prompt in the context of "
            f"{config.max_position_embeddings} (the reward model's: {reward_config.max_position_embeddings})"
        )
    return reward_config, by_text, budget


def prompt_cache(args, d, tok, budget: int, by_text, digests: dict) -> Prompts:
    """The RL prompts, rendered once by rank 0 into the data cache and mapped by every rank
    (with their conversations where the reward model scores through text)."""
    key = {
        "prompts_of": sorted(digests[f] for f in args.data),
        "exclude": sorted(map(file_digest, args.exclude)),
        "format": args.format,
        "encoding": args.encoding,
        "budget": budget,
        "tokenizer": file_digest(tok.path),
        "add_bos": tok.add_bos,  # the tokenizer_config.json beside it: does a prompt start with <s>
    }
    if by_text:
        key["conversations"] = True  # kept beside the ids, for the reward model's own rendering
    report = Report()
    conversations = bool(by_text)
    entry, meta = rendered_once(
        args.data_cache,
        args.out,
        key,
        lambda: (
            prompt_parts(args.data, args.exclude, tok, budget, report, args.format, args.encoding, conversations),
            report,
        ),
        d,
        labels=False,
    )
    prompts = Prompts(entry)  # memory-mapped: a rank holds the pages of the prompts it draws
    if not len(prompts):
        raise SystemExit(
            f"no prompts in {' '.join(map(str, args.data))} (after --exclude, and of at most {budget} tokens)"
        )
    if d.main and meta["summary"]:
        print(meta["summary"])
    return prompts


def build_models(args, d, config, weights, reward_config, tok, by_text):
    """The policy with its value head and π0's top (build), and the reward model as it scores
    (load_reward, then by ids or through text) -> (model, ref, rm)."""
    bf16 = mixed_precision(d, args)
    compute = torch.bfloat16 if bf16 else torch.float32
    mesh = device_mesh(d.device.type, d.world, args.shard_ranks)
    model, ref = build(
        config, weights, d, trainable_blocks=args.trainable_blocks, bf16=bf16, frozen_bf16=args.frozen_bf16, mesh=mesh
    )
    rm = load_reward(args.reward, reward_config, d, compute, sharded=args.reward_placement == "sharded", mesh=mesh)
    if d.main and by_text:
        print(f"scoring through text: {by_text} ({args.reward})")
    return model, ref, reward_scorer(args.reward, rm, tok)


def one_round(model, ref, rm, opt, kl_ctl, prompts, tok, s: RoundSettings, d, guard, round_no: int, step: int) -> dict:
    """The paper's round (§3.2): rollout and scores, the experience with its KL penalty, the PPO
    updates -> the round's record for metrics.jsonl (its "step": where the updates ended)."""
    timer = Timer()
    exps, seconds = rollout(model, rm, prompts, tok, s.rollout, d, round_no)
    timer.lap()  # the rollout's own parts are in `seconds`
    batches = minibatches(len(exps), s.update.batch_size, s.rollout.seed, round_no)
    kl_coef = kl_ctl.value  # the round's rewards are penalised with the λ it starts with
    sums = make_experience(
        model,
        ref,
        exps,
        batches,
        tok,
        d,
        kl_coef,
        micro_batch_size=s.update.micro_batch_size,
        bottom_batch_size=s.bottom_batch_size,
    )
    sums = {k: float(v) for k, v in sums.items()}
    mean_kl = sums["kl"] / len(exps)  # nats per response: Σ_t log π − log π0, as the penalty counts it
    experience_s = timer.lap()

    def check(k: int, loss: float, grad_norm: float):  # the step guard, before each optimizer step
        guard.check(step + k, loss, grad_norm, f"round {round_no + 1}, ")

    stats = update(model, opt, kl_ctl, exps, batches, tok, s.update, d, mean_kl, s.max_steps - step, check)
    training_s = timer.lap()
    return {
        "round": round_no + 1,
        "step": step + stats["steps"],
        "score": sum(e.score for e in exps) / len(exps),
        "kl": mean_kl,
        "kl_coef": kl_coef,
        "policy_loss": stats["policy_loss"],
        "value_loss": stats["value_loss"],
        "clip_fraction": stats["clip_fraction"],
        "approx_kl": stats["approx_kl"],
        "entropy": sums["entropy"] / sums["tokens"],
        "response_len": sums["tokens"] / len(exps),
        "unfinished": sum(not e.finished for e in exps) / len(exps),
        "reward_cut": sum(e.reward_cut for e in exps) / len(exps),  # through text, cut to the RM's context
        "rollout_tokens_per_s": sums["tokens"] / max(seconds["generate_s"], 1e-9),
        "train_tokens_per_s": stats["tokens"] / max(training_s, 1e-9),
        # Where the round's time went: sampling, the reward model, the frozen bottom and the
        # forwards of the policy, value head and π0 over the experience, the PPO updates.
        "generate_s": seconds["generate_s"],
        "score_s": seconds["score_s"],
        "experience_s": experience_s,
        "train_s": training_s,
        "idle_rows": seconds["idle_rows"],
    }


def _train(args, d):
    meta_policy, read_weights, tok = load_model(args.policy, args.out, d, seed=args.seed)
    config = meta_policy.config
    reward_config, by_text, budget = check_setup(args, config, tok)
    digests = data_digests(args)  # each file read once: the cache's key, the fingerprint and the model card
    prompts = prompt_cache(args, d, tok, budget, by_text, digests)
    steps_per_round = args.ppo_epochs * args.rollout_size // args.batch_size
    rounds = math.ceil(args.max_steps / steps_per_round)
    if d.main:
        last = args.max_steps - (rounds - 1) * steps_per_round
        print(
            f"{len(prompts)} prompts of at most {budget} tokens; {rounds} rounds of {args.rollout_size} experiences, "
            f"{steps_per_round} optimizer steps each"
            + (f" (the last {last})" if last < steps_per_round else "")
            + f"; {d.world} rank(s) on {d.device}"
        )
    model, ref, rm = build_models(args, d, config, read_weights(), reward_config, tok, by_text)
    model.train()
    opt = make_optimizer(model, args.lr, args.weight_decay, betas=BETAS)
    kl_ctl = AdaptiveKL(args.init_kl_coef, args.kl_target, args.kl_horizon)
    stream = PromptStream(prompts, args.seed)
    fingerprint = ppo_fingerprint(args, digests)
    # Resume, saves, preemption and the step guard, as SFT's and RM's: no update from a broken
    # loss, no state from NaN weights; a round's end is where a run saves and stops.
    run = Run(args, d, fingerprint, model, opt, stream)
    round_no, step = 0, run.start
    if run.resumed:
        round_no, kl_ctl.value = run.resumed["round"], run.resumed["kl_coef"]
    bar = tqdm(total=rounds, initial=round_no, disable=not d.main, desc="ppo")
    record = None  # the last round's metrics, for the checkpoint's README.md
    settings = RoundSettings.of(args)
    while round_no < rounds and step < args.max_steps:
        record = one_round(
            model, ref, rm, opt, kl_ctl, stream.take(args.rollout_size), tok, settings, d, run.guard, round_no, step
        )
        run.metrics.write(**{k: round(v, 6) if isinstance(v, float) else v for k, v in record.items()})
        round_no, step = round_no + 1, record["step"]
        bar.update(1)
        bar.set_postfix(score=f"{record['score']:.3f}", kl=f"{record['kl']:.3f}")
        # A stop signal (SIGTERM: a preemption) ends the run at a round's end: a state within a
        # round would have to hold its experiences, and a round is short (at 13B 15 s on 8 A100s,
        # 33 s with --reshard-in-rollout, 2 min on one GPU; docs/scale.md), so a cluster's
        # warning (--signal=USR1@120) covers it.
        where = f"round {round_no}, step {step}"
        run.save(
            step,
            rounds,
            bar,
            at=round_no,
            label=where,
            stopped_at=f"round {round_no}",
            round=round_no,
            kl_coef=kl_ctl.value,
        )
    bar.close()
    export_policy(model, args, d, tok, fingerprint, digests, kl_ctl, record, round_no, step)


def export_policy(model, args, d, tok, fingerprint, digests, kl_ctl, record, round_no: int, step: int):
    """final/: the policy in the HF layout, in the base model's dtype, with its model card."""
    card = card_writer(
        "ppo",
        args,
        d,
        base=args.policy,
        digests=digests,
        total=args.max_steps,
        unit="experiences",
        command="train_ppo.py",
    )
    last = [
        f"round {round_no}: mean score {record['score']:.3f}, KL to the SFT policy {record['kl']:.3f} nats, "
        f"λ_KL {kl_ctl.value:.4f}"
    ] * bool(record)
    lines = card(
        f"{round_no} rounds, {step} optimizer steps", *last, f"reward model: {args.reward} ({fingerprint['reward']})"
    )
    save_hf(model, args.out / "final", tok.path, d, lines, dtype=save_dtype(args.save_dtype, args.policy))
    if d.main:
        print(f"done: {round_no} rounds, {step} steps; the policy in {args.out / 'final'}")


def plan_parts() -> PPOParts:
    """This file's round, as the dry run's simulation runs it (plan.PPOParts)."""
    settings = dict(clip_ratio=CLIP_RATIO, clip_value=CLIP_VALUE, vf_coef=VF_COEF, grad_clip=GRAD_CLIP)
    return PPOParts(
        build_empty,
        reward_empty,
        Experience,
        minibatches,
        make_experience,
        update_step,
        generate_round,
        RolloutSettings,
        UpdateSettings,
        dict(
            settings, init_kl_coef=INIT_KL_COEF, score_batch_size=SCORE_BATCH_SIZE, bottom_batch_size=BOTTOM_BATCH_SIZE
        ),
    )


def ppo_fingerprint(args, digests: dict[str, str]) -> dict:
    """What defines a PPO run (safety.check_fingerprint refuses a resume with another); `digests`
    of its --data (safety.data_digests)."""
    keys = (
        "max_steps",
        "rollout_size",
        "chunk_size",
        "score_batch_size",
        "bottom_batch_size",
        "batch_size",
        "ppo_epochs",
        "lr",
        "weight_decay",
        "init_kl_coef",
        "kl_target",
        "kl_horizon",
        "clip_ratio",
        "clip_value",
        "vf_coef",
        "grad_clip",
        "max_new_tokens",
        "trainable_blocks",
        "unfinished_penalty",
        "seed",
    )
    return run_fingerprint(
        args,
        digests,
        keys,
        policy=model_fingerprint(args.policy),
        reward=model_fingerprint(args.reward),
        exclude=sorted(file_digest(f) for f in args.exclude),
    )


def arg_parser() -> argparse.ArgumentParser:
    """This trainer's command line (plan.layout_defaults reads its defaults)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--policy", required=True, help="the SFT model (HF layout), or 'tiny' / 'ziya-13b' with --dry-run")
    p.add_argument("--reward", help="the reward model (train_rm.py's best/ or final/)")
    p.add_argument("--data", nargs="+", help="the SFT data the prompts come from")
    p.add_argument("--exclude", nargs="*", default=[], help="preference pairs whose prompts are left out (§3.2)")
    p.add_argument(
        "--data-cache",
        type=Path,
        help="where the rendered prompts are kept (data/corpus.py), one entry per "
        "data, tokenizer and budget; runs on the same data may share one. Default: OUT/data-cache",
    )
    add_input_args(p)
    add_run_args(
        p,
        unit="experiences",
        lr=LR,
        batch_size=BATCH_SIZE,
        weight_decay=WEIGHT_DECAY,
        grad_clip=GRAD_CLIP,
        max_steps=MAX_STEPS,
        max_steps_help="optimizer steps (minibatch updates) in all",
        save_every=10,
        save_every_help="rounds between resumable states",
    )
    p.add_argument("--rollout-size", type=COUNT, default=ROLLOUT_SIZE)
    p.add_argument(
        "--chunk-size", type=COUNT, default=CHUNK_SIZE, help="prompts generated together (the paper's chunk)"
    )
    p.add_argument(
        "--score-batch-size", type=COUNT, default=SCORE_BATCH_SIZE, help="sequences the reward model scores at once"
    )
    p.add_argument(
        "--bottom-batch-size", type=COUNT, default=BOTTOM_BATCH_SIZE, help="experiences the frozen bottom runs at once"
    )
    p.add_argument(
        "--reshard-in-rollout",
        action="store_true",
        help="gather each block at every decoding step of the rollout instead of keeping the policy "
        "gathered through it (distributed.gathered): saves the unsharded policy's memory, slower",
    )
    p.add_argument(
        "--reward-placement",
        choices=["sharded", "replicated"],
        default="sharded",
        help="the reward model sharded over the ranks with FSDP, each block gathered while it scores "
        "(the default: a rank holds its share), or whole on every rank (scoring needs no "
        "collectives; 24 GiB a rank at 13B)",
    )
    p.add_argument(
        "--frozen-bf16",
        action="store_true",
        help="under bf16 mixed precision (GPU), store the frozen embedding and bottom blocks in bf16, not "
        "fp32: every number the same, half their memory, exported rounded to bf16 (default: fp32, "
        "the exported bottom the SFT model's to the bit)",
    )
    p.add_argument("--ppo-epochs", type=COUNT, default=PPO_EPOCHS)
    p.add_argument("--init-kl-coef", type=NONNEGATIVE, default=INIT_KL_COEF)
    p.add_argument(
        "--kl-target",
        type=lambda x: None if x == "none" else float(x),
        default=KL_TARGET,
        help="the adaptive controller's target KL; 'none' keeps --init-kl-coef fixed",
    )
    p.add_argument("--kl-horizon", type=COUNT, default=KL_HORIZON)
    p.add_argument("--clip-ratio", type=POSITIVE, default=CLIP_RATIO)
    p.add_argument("--clip-value", type=POSITIVE, default=CLIP_VALUE)
    p.add_argument("--vf-coef", type=NONNEGATIVE, default=VF_COEF)
    p.add_argument("--max-new-tokens", type=COUNT, default=MAX_NEW_TOKENS)
    p.add_argument(
        "--unfinished-penalty",
        type=NONNEGATIVE,
        default=UNFINISHED_PENALTY,
        help="subtracted from the score of a response cut at --max-new-tokens: a positive number lowers it, "
        "as TRL's missing_eos_penalty (0: scored as it is, as trlx)",
    )
    p.add_argument("--trainable-blocks", type=COUNT, default=TRAINABLE_BLOCKS)
    add_plan_args(p, length_flag="--plan-prompt-tokens", length_help="prompt tokens of every experience (assumed)")
    return p


def main(argv=None):
    p = arg_parser()
    args = p.parse_args(argv)
    if args.dry_run:
        return ppo_dry_run(args, plan_parts(), settings=given_settings(p, args))
    if not (args.reward and args.data and args.out):
        p.error("--reward, --data and --out are required (unless --dry-run)")
    run_distributed(_train, args)


if __name__ == "__main__":
    exit_trainer(main)
