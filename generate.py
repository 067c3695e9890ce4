"""Batched sampling from model.py's Transformer with a preallocated KV cache.

Prompts of different lengths are left-padded so that they end in the same column: the prefill
writes one block of the cache and each decoding step one more column for the whole batch.
Positions count real tokens only (model.Transformer.context), so a prompt decodes the same
alone as inside a padded batch. A sequence that has produced eos keeps stepping (the batch moves
together) but its later tokens are padding and are not returned.

The model may be sharded with FSDP (PPO samples from the policy it trains): each forward then
gathers every block's weights collectively, so a rank whose sequences have all ended keeps
stepping until every rank's have, or the others would wait forever in the next all-gather.
Sampling runs under no_grad, not inference_mode: inference tensors break FSDP2's parameters.
And it leaves the model resharded: FSDP2 keeps the root's weights (embedding, norm, head)
gathered after a forward, so until the next backward `model.parameters()` would yield those
unsharded copies, and a `model.zero_grad()` or an optimizer built then would miss the real
sharded parameters and their gradients.

    python generate.py --model DIR --prompt "我最近总是失眠，怎么办？" --max-new-tokens 128
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.fsdp import FSDPModule

from data.template import pad_batch
from model import KVCache, Transformer, token_logprobs
from pretrained import load_transformer
from safety import COUNT, NONNEGATIVE, POSITIVE, SHARE, run_main
from tokenizer import StreamDecoder, Tokenizer


@dataclass
class Generation:
    tokens: list[list[int]]  # new tokens per prompt, the final eos included when one was produced
    logprobs: list[list[float]] | None  # model.token_logprobs of each token: full vocabulary, no filters
    finished: list[bool]  # True where the sequence ended with eos rather than at max_new_tokens


def process_logits(
    logits: torch.Tensor,
    seen: torch.Tensor | None,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    repetition_penalty: float = 1.0,
    vocab_limit: int | None = None,
) -> torch.Tensor:
    """Raw logits (B, V) -> the logits actually sampled from (a new tensor), in transformers'
    order: ids past vocab_limit removed, repetition penalty, temperature, top-k, top-p."""
    logits = logits.float().clone()
    if vocab_limit is not None:
        logits[:, vocab_limit:] = float("-inf")
    if repetition_penalty != 1.0 and seen is not None:
        # CTRL's penalty: a seen token's logit is divided by the penalty if positive and
        # multiplied by it if negative, so it always becomes less likely.
        penalised = torch.where(logits > 0, logits / repetition_penalty, logits * repetition_penalty)
        logits = torch.where(seen, penalised, logits)
    if temperature <= 0:
        return logits  # greedy: the caller takes the argmax
    logits = logits / temperature
    if top_k is not None and 0 < top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        # Nucleus: keep the most likely tokens until their probability reaches top_p; the token
        # that crosses the threshold is kept, so at least one token always survives.
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        before = probs.cumsum(-1) - probs  # probability mass strictly ahead of each token
        drop_sorted = before >= top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def decode_steps(
    model: Transformer,
    prompts: list[list[int]],
    *,
    max_new_tokens: int,
    eos_id: int | None,
    pad_id: int = 0,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    repetition_penalty: float = 1.0,
    vocab_limit: int | None = None,
    generator: torch.Generator | list[torch.Generator] | None = None,
    compiled: "CompiledStep | None" = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Yield, per step, (tokens (B,), logprobs (B,), alive (B,) bool) for the batch.

    `alive` is False for sequences that had already finished before this step; their token is
    padding. eos_id None: no token ends a sequence, every one runs max_new_tokens, and nothing
    here reads a value back from the device.
    temperature 0 is greedy decoding. vocab_limit keeps ids the tokenizer cannot decode
    from being sampled (Ziya's embedding has 14 more rows than its tokenizer has pieces); the
    log-probs are those of the unfiltered model all the same (model.token_logprobs), so they
    equal what a training forward computes for the same ids. `generator` may be one per prompt:
    each row then samples from its own, and a seeded row draws the same tokens whatever else is
    in the batch (serve.py's seeded requests). `compiled` (a CompiledStep of this model, --compile)
    runs every decoding step through torch.compile over a static cache.
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token (the bos token, at least)")
    config = model.config
    device = next(model.parameters()).device
    B, P = len(prompts), max(len(p) for p in prompts)
    if P + max_new_tokens > config.max_position_embeddings:
        raise ValueError(
            f"prompt ({P} tokens) + max_new_tokens ({max_new_tokens}) "
            f"exceeds the model's context of {config.max_position_embeddings}"
        )
    total = P + max_new_tokens
    if compiled is not None:  # a static cache, whole buckets of columns: one compilation serves many lengths
        total = min(-(-total // STATIC_BUCKET) * STATIC_BUCKET, config.max_position_embeddings)
    tokens, mask = pad_batch(prompts, pad_id, left=True)  # every row's next token in column P
    tokens = F.pad(tokens, (0, total - P), value=pad_id).to(device)  # the columns generation fills
    mask = F.pad(mask, (0, total - P)).to(device)
    padded = any(len(p) < P for p in prompts)
    seen = None
    if repetition_penalty != 1.0:
        seen = torch.zeros((B, config.vocab_size), dtype=torch.bool, device=device)
        seen.scatter_(1, tokens[:, :P], mask[:, :P].bool())
    cache = KVCache(config, B, total)
    sharded = isinstance(model, FSDPModule) and dist.is_initialized() and dist.get_world_size() > 1

    alive = torch.ones(B, dtype=torch.bool, device=device)
    try:
        logits = model(tokens[:, :P], mask[:, :P] if padded else None, cache=cache, start=0, positions=slice(-1, None))[
            :, -1
        ]
        for step in range(max_new_tokens):
            scores = process_logits(
                logits,
                seen,
                temperature=temperature,
                top_k=top_k,
                top_p=top_p,
                repetition_penalty=repetition_penalty,
                vocab_limit=vocab_limit,
            )
            nxt = draw(scores, temperature, generator)
            logprob = token_logprobs(logits, nxt)
            nxt = torch.where(alive, nxt, torch.full_like(nxt, pad_id))
            pos = P + step
            tokens[:, pos] = nxt
            mask[:, pos] = 1
            if seen is not None:
                seen.scatter_(1, nxt[:, None], alive[:, None])
            yield nxt, logprob, alive.clone()
            if step == max_new_tokens - 1:
                break
            if eos_id is not None:
                alive &= nxt != eos_id
                if not any_alive(alive, sharded):
                    break
            if compiled is not None:
                logits = compiled.forward(nxt[:, None], mask, cache=cache, start=torch.tensor([pos], device=device))[
                    :, -1
                ]
            else:
                logits = model(
                    tokens[:, pos : pos + 1], mask[:, : pos + 1] if padded else None, cache=cache, start=pos
                )[:, -1]
    finally:
        if isinstance(model, FSDPModule):
            model.reshard()  # see the module docstring


def draw(scores: torch.Tensor, temperature: float, generator=None) -> torch.Tensor:
    """The next tokens (B,) from processed logits (B, V) (process_logits): the argmax at
    temperature 0, else one draw a row, each from its own generator when given a list of them
    (a seeded row then draws the same tokens whatever else is in the batch)."""
    if temperature <= 0:
        return scores.argmax(-1)
    probs = scores.softmax(-1)
    if isinstance(generator, list):
        return torch.cat([torch.multinomial(p[None], 1, generator=g)[0] for p, g in zip(probs, generator)])
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


class CacheRows:
    """Sequences decoding together in the rows of one KV cache, each at its own length (a cache
    column per row: model.KVCache's (B, 1) start), the server's requests and PPO's rollout
    queue. Rows 0 .. n-1 are the live ones, each holding what decodes in it (`items`: the
    server's Row, the rollout's prompt index) beside the columns it has filled (`lengths`): a
    sequence joins with its prompt's keys and values (add), every live one takes a step at once
    (step), and those that ended leave, the rows after them moving down (keep). An item and its
    columns change only together, so no path (a failed step among them: clear) can leave a
    row's length behind for the next sequence to attend to."""

    def __init__(self, config, rows: int, columns: int):
        self.cache = KVCache(config, rows, columns)
        self.items, self.lengths = [], []  # lengths: the cache columns each live row has filled

    def __len__(self) -> int:
        return len(self.items)

    def add(self, item, prefill: KVCache, length: int):
        """`item` joins as the last row, its first `length` columns those of `prefill`'s row 0."""
        self.cache.copy_row(len(self.items), prefill, 0, length)
        self.items.append(item)
        self.lengths.append(length)

    def step(self, model, tokens: list[int], device) -> torch.Tensor:
        """Every live row's next token written at its own length, each attending to its own
        columns only -> the logits of what follows, (B, V)."""
        start = torch.tensor([[n] for n in self.lengths], device=device)  # (B, 1): a column each
        mask = torch.arange(max(self.lengths) + 1, device=device)[None] <= start
        logits = model(torch.tensor([[t] for t in tokens], device=device), mask, cache=self.cache, start=start)
        self.lengths = [n + 1 for n in self.lengths]
        return logits[:, -1]

    def keep(self, keep: list[bool]):
        """The rows whose `keep` is False leave; the others move down, in order."""
        items, lengths = [], []
        for row, (item, length, stays) in enumerate(zip(self.items, self.lengths, keep)):
            if stays:
                if row != len(items):
                    self.cache.copy_row(len(items), self.cache, row, length)
                items.append(item)
                lengths.append(length)
        self.items, self.lengths = items, lengths

    def clear(self):
        """Every row leaves (a step that failed): the next sequence starts at row 0, column 0."""
        self.items, self.lengths = [], []


@torch.no_grad()
def generate_queue(
    model,
    prompts: list[list[int]],
    generators: list[torch.Generator],
    *,
    rows: int,
    max_new_tokens: int,
    eos_id: int,
    pad_id: int = 0,
    temperature: float = 1.0,
    vocab_limit: int | None = None,
    readback=None,
) -> tuple[Generation, float]:
    """Every prompt sampled, `rows` at a time, through a queue: a row whose response ended takes
    the next prompt at the next step, so that no row steps on while another row's response
    goes on (a batch at a time keeps its ended rows stepping until its longest ends): CacheRows,
    as serve.py's engine. Prompt i samples from
    generators[i], so a prompt's response is the same whichever prompts share its steps.
    -> (the Generation, in the order of `prompts`; the share of the decoding steps' rows that
    had no prompt to run, which only the queue's last prompts leave).

    On an FSDP-sharded model every forward gathers weights collectively, so all ranks make the
    same calls: each step they agree (one all-reduce) on how many prompts any of them admits and
    whether any has a row left, and a rank with fewer runs a one-token forward of its own
    instead; the policy is resharded at the end, as decode_steps leaves it.

    readback(tokens, indices) -> list[int]: what the tokens drawn for prompts `indices` are
    taken to be; None reads them from the device. A simulation on fake tensors, which hold no
    values, says what they are (simulate.measure_ppo: every response its length, then the eos)."""
    device = next(model.parameters()).device
    config = model.config
    sharded = isinstance(model, FSDPModule) and dist.is_initialized() and dist.get_world_size() > 1

    def agreed(value: int) -> int:  # the largest over the ranks
        t = torch.tensor(value, device=device)
        if sharded:
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return int(t)

    def idle_forward():  # a rank with nothing to run this call takes part in the collectives
        model(torch.full((1, 1), pad_id, device=device), cache=KVCache(config, 1, 1), start=0)

    def sample(logits: torch.Tensor, indices: list[int]) -> list[int]:
        scores = process_logits(logits, None, temperature=temperature, vocab_limit=vocab_limit)
        tokens = draw(scores, temperature, [generators[i] for i in indices])
        return tokens.tolist() if readback is None else readback(tokens, indices)

    out, finished = [[] for _ in prompts], [False] * len(prompts)
    live = CacheRows(config, rows, max(map(len, prompts), default=1) + max_new_tokens)  # items: prompt indices
    queue = list(range(len(prompts)))[::-1]
    row_steps = used = 0

    def take(i: int, token: int) -> bool:
        """Prompt i's new token; whether its response goes on."""
        out[i].append(token)
        finished[i] = token == eos_id
        return not finished[i] and len(out[i]) < max_new_tokens

    # A prefill and a decoding step are functions of their own, so that their logits and the
    # prompt's own cache are freed when they return, not held through the next forward.
    def prefill(i: int) -> int:
        """Prompt i's keys and values into the next row -> its first token."""
        cache = KVCache(config, 1, len(prompts[i]))
        tokens = torch.tensor([prompts[i]], device=device)
        logits = model(tokens, cache=cache, start=0, positions=slice(-1, None))[:, -1]
        live.add(i, cache, len(prompts[i]))
        return sample(logits, [i])[0]

    def step() -> list[int]:
        """Every live row's next token."""
        logits = live.step(model, [out[i][-1] for i in live.items], device)
        return sample(logits, live.items)

    try:
        while True:
            admitted = [queue.pop() for _ in range(min(rows - len(live), len(queue)))]
            keep = [True] * len(live)
            for n in range(agreed(len(admitted))):
                if n >= len(admitted):
                    idle_forward()
                    continue
                keep.append(take(admitted[n], prefill(admitted[n])))
            live.keep(keep)
            if not agreed(int(bool(live.items or queue))):
                break
            if not live.items:
                idle_forward()
                continue
            row_steps, used = row_steps + rows, used + len(live)
            live.keep([take(i, token) for i, token in zip(live.items, step())])
    finally:
        if isinstance(model, FSDPModule):
            model.reshard()  # see the module docstring
    return Generation(out, None, finished), 1 - used / row_steps if row_steps else 0.0


# The static cache of a compiled decoding step has a multiple of this many columns.
STATIC_BUCKET = 256


class CompiledStep:
    """`model`'s forward compiled for one decoding step over a static cache (--compile), held by
    the caller that decodes (evaluate.Doctor, `train_rm.py sample`, generate.py) and passed to
    decode_steps; the model keeps no state of it.

    Every step has the same shapes (one token per sequence, the whole cache, a mask over all of
    it), so torch.compile traces it once per batch size and cache bucket, and inductor fuses
    the small operations between the matrix products (norms, RoPE, the cache write, residual
    adds) that eager mode dispatches one at a time. The weights stay inputs of the compiled
    graph, so a model that goes on training decodes with its current weights."""

    def __init__(self, model: Transformer):
        if isinstance(model, FSDPModule):
            raise ValueError("compiled decoding needs the whole model on this rank, not an FSDP-sharded one")
        self.forward = torch.compile(model.forward, fullgraph=True, dynamic=False)


def any_alive(alive: torch.Tensor, across_ranks: bool) -> bool:
    """Whether any sequence still runs: on this rank, or, for a sharded model, on any rank."""
    flag = alive.any().to(torch.int32)
    if across_ranks:
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag)


@torch.no_grad()
def generate(
    model: Transformer,
    prompts: list[list[int]],
    *,
    max_new_tokens: int,
    eos_id: int,
    return_logprobs: bool = False,
    **sampling,
) -> Generation:
    """Sample continuations of a batch of prompts; see decode_steps for the options."""
    out = [[] for _ in prompts]
    lps = [[] for _ in prompts]
    finished = [False] * len(prompts)
    for tokens, logprobs, alive in decode_steps(
        model, prompts, max_new_tokens=max_new_tokens, eos_id=eos_id, **sampling
    ):
        for i in alive.nonzero().flatten().tolist():
            out[i].append(int(tokens[i]))
            lps[i].append(float(logprobs[i]))
            finished[i] = int(tokens[i]) == eos_id
    return Generation(out, lps if return_logprobs else None, finished)


@torch.no_grad()
def stream(model: Transformer, prompt: list[int], *, max_new_tokens: int, eos_id: int, **sampling) -> Iterator[int]:
    """Yield the new tokens of one prompt as they are sampled (for chat); stops after eos."""
    for tokens, _, _ in decode_steps(model, [prompt], max_new_tokens=max_new_tokens, eos_id=eos_id, **sampling):
        yield int(tokens[0])


def held_back(text: str, stop: str) -> int:
    """The length of the longest end of `text` that a stop string starts with, short of all of
    it: what must be held back in case the stop string is arriving. Linear in len(stop) (KMP's
    failure function over stop, then a walk over text's last len(stop) - 1 characters)."""
    if len(stop) < 2:
        return 0
    fail = [0] * len(stop)
    k = 0
    for i in range(1, len(stop)):
        while k and stop[i] != stop[k]:
            k = fail[k - 1]
        k += stop[i] == stop[k]
        fail[i] = k
    k = 0
    for c in text[-(len(stop) - 1) :]:
        while k and c != stop[k]:
            k = fail[k - 1]
        k += c == stop[k]
        if k == len(stop):  # a whole stop string ends here; push cuts at it before asking
            k = fail[k - 1]
    return k


class ReplyText:
    """The text of one reply as its tokens arrive. Stop strings end it (and are not part of it); text that could be the
    start of a stop string is held back until it is known not to be, and so is whitespace at
    either end, so the streamed pieces always add up to the final content, which is the
    decoded reply stripped (as evaluate.Doctor returns it). serve.py and chat.py stream with it.
    Each token costs time linear in the stop strings' and the token's lengths, not the reply's
    (only the text that could hold a new match is searched)."""

    def __init__(self, tok: Tokenizer, stop: list[str], max_tokens: int):
        self.decoder, self.stop, self.max_tokens = StreamDecoder(tok), stop, max_tokens
        self.text, self.sent, self.tokens, self.finish = "", 0, 0, None
        self.longest = max(map(len, stop), default=0)

    def push(self, token: int, eos: int) -> str:
        """Take one sampled token; return the text that became final."""
        self.tokens += 1
        searched = max(0, len(self.text) - self.longest + 1)  # a new match ends in the new text
        if token != eos:
            self.text += self.decoder.push(token)
        if token == eos or self.tokens >= self.max_tokens:
            self.text += self.decoder.flush()
        hits = [i for i in (self.text.find(s, searched) for s in self.stop) if i >= 0]
        if hits:
            self.text = self.text[: min(hits)]
            return self._end("stop")
        if token == eos or self.tokens >= self.max_tokens:
            return self._end("stop" if token == eos else "length")
        start = len(self.text) - len(self.text.lstrip())
        hold = max((held_back(self.text, s) for s in self.stop), default=0)
        end = min(len(self.text) - hold, len(self.text.rstrip()))
        return self._take(max(start, self.sent), end)

    def _end(self, reason: str) -> str:
        self.finish = reason
        content = self.text.strip()
        start = len(self.text) - len(self.text.lstrip())
        return self._take(max(start, self.sent), start + len(content))

    def _take(self, start: int, end: int) -> str:
        if end <= start:
            return ""
        self.sent = end
        return self.text[start:end]

    @property
    def content(self) -> str:
        return self.text.strip()


# -- where inference runs ----------------------------------------------------------------------

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def add_device_args(p: argparse.ArgumentParser, compile: bool = True):
    """--device and --dtype for every command that loads a model to run it; --compile for
    those that generate."""
    p.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda if there is one, else cpu)")
    p.add_argument(
        "--dtype", choices=sorted(DTYPES), help="weights and compute (default: bfloat16 on a GPU, float32 on the CPU)"
    )
    if compile:
        p.add_argument(
            "--compile",
            action="store_true",
            help="compile the decoding step (torch.compile, static cache): each new batch size and "
            f"length bucket of {STATIC_BUCKET} compiles once first; see README, Benchmarks",
        )


def add_sampling_args(
    p: argparse.ArgumentParser,
    *,
    max_new_tokens: int,
    temperature: float,
    top_p: float | None,
    repetition_penalty: float,
    why: str = "",
):
    """--max-new-tokens, --temperature, --top-p, --repetition-penalty and --seed, with the
    command's defaults (`why` says where they come from, in --help)."""
    p.add_argument(
        "--max-new-tokens", type=COUNT, default=max_new_tokens, help=f"per reply (default: {max_new_tokens})"
    )
    p.add_argument(
        "--temperature", type=NONNEGATIVE, default=temperature, help=f"0: greedy (default: {temperature}{why})"
    )
    p.add_argument("--top-p", type=SHARE, default=top_p, help=f"nucleus sampling (default: {top_p})")
    p.add_argument(
        "--repetition-penalty",
        type=POSITIVE,
        default=repetition_penalty,
        help=f"CTRL's penalty, 1: none (default: {repetition_penalty})",
    )
    p.add_argument("--seed", type=int, default=0, help="seeds the sampling (default: 0)")


def load(path, *, device="cpu", dtype=torch.float32) -> tuple[Transformer, Tokenizer]:
    """A checkpoint in the HF layout and its tokenizer, ready to generate: every command that
    runs a model for its text (generate, chat, serve, evaluate, sampling) loads it here."""
    model = load_transformer(path, dtype=dtype, device=device).eval()
    tok = Tokenizer(Path(path) / "tokenizer.model")
    tok.check_model_vocab(model.config.vocab_size, where=f"model {path}")
    return model, tok


def device_and_dtype(args) -> tuple[torch.device, torch.dtype]:
    """The --device/--dtype of add_device_args, defaults filled in. A 13B model is 52 GB in
    fp32 and 26 GB in bf16; LLaMA was trained in bf16, so on a GPU that is the default."""
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {args.device}: no CUDA device is available here")
    dtype = DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    return device, dtype


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="an HF-format directory with tokenizer.model")
    p.add_argument(
        "--prompt",
        required=True,
        help="raw text, encoded as the tokenizer does (<s> where it adds one; no chat template)",
    )
    add_sampling_args(p, max_new_tokens=128, temperature=0.7, top_p=0.9, repetition_penalty=1.0)
    p.add_argument("--top-k", type=COUNT, default=None)
    add_device_args(p)
    args = p.parse_args(argv)
    device, dtype = device_and_dtype(args)
    model, tok = load(args.model, device=device, dtype=dtype)
    decoder = StreamDecoder(tok)
    for t in stream(
        model,
        tok.encode(args.prompt, bos=tok.add_bos),
        max_new_tokens=args.max_new_tokens,
        eos_id=tok.eos_id,
        pad_id=tok.pad_id,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        repetition_penalty=args.repetition_penalty,
        vocab_limit=len(tok),
        generator=torch.Generator(device).manual_seed(args.seed),
        compiled=CompiledStep(model) if args.compile else None,
    ):
        print(decoder.push(t), end="", flush=True)
    print()


if __name__ == "__main__":
    sys.exit(run_main(main))
