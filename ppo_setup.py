"""What a PPO round runs on (train_ppo.py's round, §3.2): the policy with its value head and the
reference π0's top placed over the ranks, the reward model (sharded or replicated; scoring by
ids, or through text where its tokenizer or prompt format is not the policy's), and the RL
prompts, rendered once into the data cache and drawn in shuffled passes.

    build, build_empty          the policy + value head sharded, π0's top replicated (paper App. E:
                                only the last TRAINABLE_BLOCKS train; the bottom is shared)
    load_reward, reward_empty   the reward model, frozen, in the compute dtype, without its LM head
    reward_scorer, TextReward   how the round scores: ids to ids, or through text (as trlx did)
    prompt_budget, read_prompts, prompt_parts, Prompts, PromptStream    the prompts
    RolloutSettings, UpdateSettings, RoundSettings    the flags a round's functions read (.of(args))
"""

from __future__ import annotations

import json
import random
import sys
from dataclasses import dataclass, fields, replace
from pathlib import Path

import torch
import torch.distributed as dist

from data.corpus import Corpus
from data.readers import read
from data.schema import Report
from data.template import pad_batch, render, reward_ids
from distributed import frozen_in_bf16, load_sharded, shard
from model import PolicyWithValue, RewardModel, Transformer, allocate
from pretrained import load_reward_model, read_reward_model, reward_format, reward_has_bias
from safety import file_digest

# Paper App. E: "only the parameters of the last two layers are updated"; the policy's shape.

# -- the policy with its value head, π0's top and the reward model, placed over the ranks ----------


TRAINABLE_BLOCKS = 2  # model.PolicyWithValue trains the last TRAINABLE_BLOCKS blocks


def sft_name(name: str, first_trainable: int) -> str:
    """A tensor of π0's top -> its name in the SFT model: the top's blocks are the SFT model's
    blocks from `first_trainable` on, renumbered from 0; the final norm and the head keep their names."""
    if name.startswith("layers."):
        _, i, rest = name.split(".", 2)
        return f"layers.{int(i) + first_trainable}.{rest}"
    return name


def reference_top(config, first_trainable: int, device, dtype) -> Transformer:
    """π0's top, empty: a frozen copy of the SFT blocks [first_trainable, L), norm and head, as a small
    Transformer run on the shared bottom's output (forward(hidden=...)). Replicated on every
    rank: two blocks and a head (1.7 GB in bf16 for Ziya-13B). load_reference fills it."""
    top_config = replace(config, num_hidden_layers=config.num_hidden_layers - first_trainable)
    with torch.device("meta"):
        ref = Transformer(top_config)
    if not config.tie_word_embeddings:
        ref.embed_tokens = None  # never run: the input is the bottom's residual stream
    return allocate(ref, device=device, dtype=dtype).eval().requires_grad_(False)


@torch.no_grad()
def load_reference(ref: Transformer, full: dict | None, first_trainable: int, d):
    """Fill π0's top from rank 0's SFT state dict (`full`; None elsewhere): rank 0 broadcasts
    these tensors alone, in the top's dtype, as tensors. Every rank knows their names and
    shapes from the config, so no other rank ever receives, and no object collective carries,
    any of the rest of the model."""
    for name, tensor in ref.named_parameters():  # a tied head is the embedding: once
        if d.main:
            tensor.copy_(full[sft_name(name, first_trainable)])
        if d.world > 1:
            dist.broadcast(tensor, src=0)


def build(
    config,
    weights,
    d,
    *,
    trainable_blocks: int = TRAINABLE_BLOCKS,
    bf16: bool = False,
    frozen_bf16: bool = False,
    mesh=None,
):
    """(the sharded policy + value head, π0's replicated top) from rank 0's SFT weights (a state
    dict, or its groups file by file as training.load_model reads them; None on the other
    ranks). Each rank receives its shards of the policy and π0's top, nothing else
    (load_reference, distributed.load_sharded); rank 0 keeps the top's tensors as the files pass,
    and nothing else of them. The value head starts at zero: V = 0 everywhere."""
    model, ref = build_empty(
        config, d, trainable_blocks=trainable_blocks, bf16=bf16, frozen_bf16=frozen_bf16, mesh=mesh
    )
    top_names = {sft_name(name, model.first_trainable) for name, _ in ref.named_parameters()}
    top = {}

    def policy_groups():
        for group in [weights] if isinstance(weights, dict) else weights:
            top.update({k: v for k, v in group.items() if k in top_names})
            yield {f"policy.{k}": v for k, v in group.items()}
        yield {"value_head.weight": torch.zeros(1, config.hidden_size, dtype=torch.get_default_dtype())}

    load_sharded(model, policy_groups() if d.main else None, d)
    load_reference(ref, top if d.main else None, model.first_trainable, d)
    return model.train(), ref


def build_empty(
    config, d, *, trainable_blocks: int = TRAINABLE_BLOCKS, bf16: bool = False, frozen_bf16: bool = False, mesh=None
):
    """The policy + value head sharded with FSDP (distributed.shard, over `mesh`) and π0's top,
    allocated and not filled. The policy is stored in the default dtype, as it is built in it
    (fp32); π0's top too, or bf16 under mixed precision, the dtype it computes in.
    frozen_bf16 (--frozen-bf16), under mixed precision: the frozen embedding and bottom blocks
    stored in bf16, as LoRA's frozen base is (distributed.shard_and_load). Every forward is the
    same to the bit, since FSDP casts each weight to bf16 before computing either way, and
    nothing trains them; they take half the memory (24.2 GiB in place of 48.4 at 13B on one
    rank) and are exported rounded to bf16."""
    with torch.device("meta"):
        model = PolicyWithValue(Transformer(config), trainable_blocks)
    if bf16 and frozen_bf16:
        frozen_in_bf16(model)
    shard(model, model.layers, bf16=bf16, mesh=mesh)
    model.to_empty(device=d.device)
    ref = reference_top(config, model.first_trainable, d.device, torch.bfloat16 if bf16 else torch.get_default_dtype())
    return model, ref


def reward_empty(config, d, dtype, *, sharded: bool = True, mesh=None, bias: bool = False) -> RewardModel:
    """The reward model for scoring, frozen, in the compute dtype, without its LM head
    (RewardModel.scorer), allocated and not filled (load_reward fills it). sharded
    (--reward-placement sharded, the default): FSDP over the ranks as the policy is, each block
    gathered just before it scores and freed after, so a rank holds its share (3.0 GiB at 13B on
    8 ranks in bf16) and a scoring chunk all-gathers the model once. Replicated: the whole model
    on every rank (24.0 GiB), scoring without collectives."""
    with torch.device("meta"):
        rm = RewardModel(config, bias=bias).scorer().eval().requires_grad_(False)
    if not sharded:
        return allocate(rm, device=d.device, dtype=dtype)
    for p in rm.parameters():
        p.data = p.data.to(dtype)  # on the meta device: only the dtype changes
    shard(rm, rm.layers, bf16=False, mesh=mesh)  # stored in the compute dtype: no mixed precision
    return rm.to_empty(device=d.device)


def load_reward(path, config, d, dtype, *, sharded: bool = True, mesh=None) -> RewardModel:
    """The reward model at `path` placed as reward_empty says. Sharded, rank 0 reads the
    checkpoint and each rank receives its shards (distributed.load_sharded); replicated, every
    rank reads it whole."""
    if not sharded:
        return load_reward_model(path, dtype=dtype, device=d.device).scorer().eval().requires_grad_(False)
    weights = read_reward_model(path, dtype=dtype) if d.main else None  # file by file
    return load_sharded(reward_empty(config, d, dtype, mesh=mesh, bias=reward_has_bias(path)), weights, d)


# -- the reward model's scores: by ids, or through text --------------------------------------------


def reward_scorer(path, rm: RewardModel, policy_tok):
    """The reward model as PPO scores with it: by ids where it reads the policy's tokenizer in
    data.template's format (train_rm.py's models), else through text (TextReward)."""
    if reward_by_text(path, policy_tok) is None:
        return rm
    return TextReward(rm, reward_tokenizer(path, policy_tok), policy_tok, reward_format(path))


def reward_tokenizer(path, policy_tok):
    """The reward model's own tokenizer (tokenizer.model beside it), else the policy's."""
    from tokenizer import Tokenizer

    own = Path(path) / "tokenizer.model"
    return Tokenizer(own) if own.is_file() else policy_tok


def reward_by_text(path, policy_tok) -> str | None:
    """Why the reward model at `path` is scored through text (its prompt format, or a tokenizer
    that is not the policy's: other pieces, or another <s> setting), or None: by ids."""
    fmt, tok = reward_format(path), reward_tokenizer(path, policy_tok)
    if fmt != "huatuo":
        return f"its prompt format is {fmt}"
    if tok is not policy_tok and (
        file_digest(tok.path) != file_digest(policy_tok.path) or tok.add_bos != policy_tok.add_bos
    ):
        return "its tokenizer is not the policy's"
    return None


class TextReward:
    """A reward model whose tokenizer or prompt format is not the policy's (the released
    HuatuoGPT reward model: LLaMA's vocabulary, the "ziya-rm" format), scored through text as
    trlx scores: the policy's response decoded, the conversation and it rendered in the reward
    model's own format (data.template.reward_ids), encoded with its own tokenizer, read at the
    eos that format puts after the reply. Chosen by the reward model's checkpoint (reward_scorer),
    never by a flag. Each rank scores its own experiences, as by ids. A text too long for the
    reward model's context loses its oldest rounds first; one whose last question and reply
    alone do not fit is cut to the context (eos kept last) and counted (Experience.reward_cut)."""

    def __init__(self, module: RewardModel, tok, policy_tok, prompt_format: str):
        self.module, self.tok, self.policy_tok, self.prompt_format = module, tok, policy_tok, prompt_format

    def ids(self, e) -> list[int]:
        """The ids the reward model scores for experience `e` (train_ppo.Experience)."""
        reply, limit = self.policy_tok.decode(e.response), self.module.config.max_position_embeddings
        try:
            return reward_ids(self.tok, e.messages, reply, self.prompt_format, max_len=limit)
        except ValueError:
            e.reward_cut = True
            whole = reward_ids(self.tok, e.messages, reply, self.prompt_format, max_len=sys.maxsize)
            return whole[: limit - 1] + [self.tok.eos_id]

    def score(self, exps: list) -> torch.Tensor:
        tokens, mask = pad_batch([self.ids(e) for e in exps], self.tok.pad_id)
        device = next(self.module.parameters()).device
        return self.module(tokens.to(device), mask.to(device))


# -- prompts ---------------------------------------------------------------------------------------


def prompt_budget(policy_config, reward_config, max_new_tokens: int) -> int:
    """The longest prompt a round can take: the policy generates up to max_new_tokens after it
    within its context, and the reward model reads prompt + response + the eos put after a
    response cut at max_new_tokens (score_ids) within its own."""
    if reward_config is None:  # a reward model scored through text: it fits its own tokens
        return policy_config.max_position_embeddings - max_new_tokens
    return min(
        policy_config.max_position_embeddings - max_new_tokens,
        reward_config.max_position_embeddings - max_new_tokens - 1,
    )


def read_prompts(files, exclude, tok, budget: int, report: Report, fmt=None, encoding="utf-8", kept=None):
    """The RL prompts (§3.2), yielded as token ids: every patient turn of the SFT data with the
    conversation before it (single- and multi-turn), de-duplicated, minus the prompts the reward
    model's pairs were built from (--exclude), rendered with the one template, in the order of
    their content. train_ppo.py writes them once into its data cache (data.corpus). `kept` (a
    list) collects each yielded prompt's conversation, as its JSON (prompt_parts)."""
    excluded = {
        json.dumps(r["messages"], ensure_ascii=False)
        for f in exclude or []
        for r in read(f, "pairs", report=report, encoding=encoding)
    }
    seen = {}
    for f in files:
        for r in read(f, fmt, report=report, encoding=encoding):
            for i in range(0, len(r["messages"]), 2):
                messages = r["messages"][: i + 1]
                key = json.dumps(messages, ensure_ascii=False)
                if key in excluded:
                    report.skip("a prompt of the reward model's pairs", r["id"])
                elif key not in seen:
                    seen[key] = messages
    for key in sorted(seen):
        try:
            ids = render(tok, seen[key], max_len=budget).ids
        except ValueError:
            report.skip(f"question longer than the context less --max-new-tokens ({budget} tokens)", key[:40])
            continue
        if kept is not None:
            kept.append(key)
        yield ids


def prompt_parts(files, exclude, tok, budget: int, report: Report, fmt=None, encoding="utf-8", conversations=False):
    """The cache entry's parts: "prompts" (read_prompts' ids) and, for a reward model scored
    through text, "conversations", each prompt's conversation as the UTF-8 bytes of its JSON (one
    int32 a byte: the corpus layout), in the same order. The parts are written one after the
    other (data.corpus.build_entry): the conversations are listed as the prompts are written."""
    kept = [] if conversations else None
    parts = {"prompts": read_prompts(files, exclude, tok, budget, report, fmt, encoding, kept=kept)}
    if conversations:
        parts["conversations"] = (list(key.encode("utf-8")) for key in kept)  # read once the prompts are written
    return parts


class Prompt(list):
    """A prompt's ids (a list, as generation takes them) and, for a reward model scored through
    text, its conversation."""

    messages: list | None = None


class Prompts:
    """The cached prompts, memory-mapped, as Prompt items (their conversations attached where
    the entry holds them)."""

    def __init__(self, entry: Path):
        self.ids = Corpus(entry / "prompts")
        self.conversations = Corpus(entry / "conversations") if (entry / "conversations").is_dir() else None

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> Prompt:
        prompt = Prompt(self.ids[i])
        if self.conversations is not None:
            prompt.messages = json.loads(bytes(self.conversations[i]).decode("utf-8"))
        return prompt


class PromptStream:
    """Prompts in passes: each pass a shuffle fixed by (seed, pass); the position is saved."""

    def __init__(self, prompts: list, seed: int):
        self.prompts, self.seed, self.passes, self.position = prompts, seed, 0, 0

    def take(self, n: int) -> list:
        out = []
        while len(out) < n:
            order = list(range(len(self.prompts)))
            random.Random(f"{self.seed}:prompts:{self.passes}").shuffle(order)
            while self.position < len(order) and len(out) < n:
                out.append(self.prompts[order[self.position]])
                self.position += 1
            if self.position == len(order):
                self.passes, self.position = self.passes + 1, 0
        return out

    def state_dict(self) -> dict:
        return {"passes": self.passes, "position": self.position}

    def load_state_dict(self, state: dict):
        self.passes, self.position = state["passes"], state["position"]


# -- the flags a round reads ------------------------------------------------------------------------


class Settings:
    """A group of the run's flags, each field named as its flag: `of(args)` takes those and no
    others, so a function of the round shows what it reads."""

    @classmethod
    def of(cls, args):
        return cls(**{f.name: getattr(args, f.name) for f in fields(cls)})


@dataclass(frozen=True)
class RolloutSettings(Settings):
    """What a round's rollout reads (generate_round, score_round)."""

    seed: int  # with the round and a prompt's place in it, seeds the prompt's sampling
    chunk_size: int  # rows decoding at once (trlx's chunk_size)
    max_new_tokens: int
    score_batch_size: int
    unfinished_penalty: float
    reshard_in_rollout: bool


@dataclass(frozen=True)
class UpdateSettings(Settings):
    """What the PPO updates read (update, update_step), in trlx's names (App. E)."""

    ppo_epochs: int
    batch_size: int
    micro_batch_size: int
    clip_ratio: float
    clip_value: float
    vf_coef: float
    grad_clip: float
    grad_sync: str


@dataclass(frozen=True)
class RoundSettings:
    """Everything one_round reads: the rollout's, the updates', the frozen bottom's batch and
    where the run stops."""

    rollout: RolloutSettings
    update: UpdateSettings
    bottom_batch_size: int
    max_steps: int

    @classmethod
    def of(cls, args):
        return cls(RolloutSettings.of(args), UpdateSettings.of(args), args.bottom_batch_size, args.max_steps)
