"""Sampling from model.py's Transformer: one decoding path, a queue over the rows of one KV cache.

decode_steps runs every sampling in the project: evaluation, `train_rm.py sample`, chat and
generate.py decode a fixed batch (the queue whose prompts all start at once), PPO's rollout a
queue of more prompts than rows, where a row whose response ended takes the next prompt. Each
prompt is prefilled alone and joins a row (CacheRows); then every row steps at once, each
writing its own next column and attending to its own columns, so a prompt decodes the same
alone as beside others, and no row carries padding. serve.py's engine schedules the same rows
itself, request by request.

decode_steps' options. eos_id None: no token ends a response, every one runs max_new_tokens,
and nothing is read back from the device (simulate.simulate_sampling runs it on fake tensors).
temperature 0 is greedy decoding. vocab_limit keeps ids the tokenizer cannot decode from
being sampled (Ziya's embedding has 14 more rows than its tokenizer has pieces); the
log-probs are those of the unfiltered model all the same (model.token_logprobs), so they
equal what a training forward computes for the same ids. `generator`: one for the batch,
which draws as torch.multinomial draws a batch whatever rows have ended (see draw); or one
per prompt, which a queue needs: a prompt's response is then the same whatever prompts
share its steps (PPO's rollout, serve.py's seeded requests). `compiled` (a CompiledStep of
this model, --compile) runs every decoding step through torch.compile over a static cache;
its rows keep their places to the end (a shape of their own for each would compile again),
an ended one stepping on with its tokens dropped. readback(tokens, prompts) -> list[int]:
what the tokens drawn are taken to be, for a simulation on fake tensors, which hold no
values (simulate.measure_ppo); None reads them from the device when an eos is looked for.

The model may be sharded with FSDP (PPO samples from the policy it trains): each forward then
gathers every block's weights collectively, so a rank whose sequences have all ended keeps
making forwards until every rank's have, or the others would wait forever in the next
all-gather.
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
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
import torch.distributed as dist
from torch.distributed.fsdp import FSDPModule

from model import KVCache, Transformer, token_logprobs
from pretrained import load_transformer
from safety import COUNT, NONNEGATIVE, POSITIVE, SHARE, run_main
from tokenizer import StreamDecoder, Tokenizer


@dataclass
class Generation:
    tokens: list[list[int]]  # new tokens per prompt, the final eos included when one was produced
    logprobs: list[list[float]] | None  # model.token_logprobs of each token: full vocabulary, no filters
    finished: list[bool]  # True where the sequence ended with eos rather than at max_new_tokens
    idle_rows: float = 0.0  # the share of the decoding steps' rows that had no prompt to run (a queue's tail)


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


@dataclass
class Step:
    """What one forward of decode_steps drew: a token for each prompt still running in it."""

    prompts: list[int]  # the prompts that drew (indices into decode_steps' `prompts`)
    tokens: torch.Tensor  # (len(prompts),) on the model's device
    logprobs: torch.Tensor | None  # model.token_logprobs of each (full vocabulary, no filters), when asked for
    values: list[int] | None  # the tokens as read back, when decode_steps read them (an eos to look for)
    rows: int  # the rows the step ran: the queue's width for a decoding step, 0 for a prefill


def decode_steps(
    model: Transformer,
    prompts: list[list[int]],
    *,
    max_new_tokens: int,
    eos_id: int | None,
    rows: int | None = None,
    pad_id: int = 0,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    repetition_penalty: float = 1.0,
    vocab_limit: int | None = None,
    generator: torch.Generator | list[torch.Generator] | None = None,
    compiled: "CompiledStep | None" = None,
    readback=None,
    logprobs: bool = False,
) -> Iterator[Step]:
    """Sample continuations of `prompts` through a queue of `rows` rows of one KV cache
    (CacheRows), yielding each forward's new tokens (a Step). The one decoding path: a fixed
    batch is the queue whose prompts all start at once (rows: all of them, the default).

      1. the waiting prompts take the free rows, each prefilled alone (no padding: a prompt's
         keys are the same in any batch), and draw their first tokens together;
      2. every running row takes a step at once, each at its own length (a column per row);
      3. a response that produced eos or max_new_tokens ends: its row leaves, the rows after it
         moving down, and the next waiting prompt takes it at step 1.

    The options (eos_id None, vocab_limit, generator, compiled, readback): the module docstring.
    logprobs: each Step carries its tokens' log-probs (a log-softmax a step: only when asked).

    On an FSDP-sharded model the ranks agree at each step on whether any admits prompts or has a
    row left (agreed_max); one with nothing to run makes a forward of nothing (idle_forward).
    Run it under no_grad, as generate and stream do (not as a decorator: torch's wrapper of a
    generator holds the last Step through the next forward)."""
    if any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token (the bos token, at least)")
    config, device = model.config, next(model.parameters()).device
    rows = rows or max(len(prompts), 1)
    if rows < len(prompts) and (compiled is not None or (temperature > 0 and not isinstance(generator, list))):
        raise ValueError("a queue (rows < prompts) decodes eagerly, each prompt from a generator of its own")
    columns = cache_columns(config, prompts, max_new_tokens, compiled is not None)
    live = CacheRows(config, rows, columns, vocab=config.vocab_size if repetition_penalty != 1.0 else None)
    sharded = isinstance(model, FSDPModule) and dist.is_initialized() and dist.get_world_size() > 1
    responses = Responses(len(prompts), max_new_tokens, eos_id)
    waiting = deque(range(len(prompts)))
    sampling = dict(
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        repetition_penalty=repetition_penalty,
        vocab_limit=vocab_limit,
    )

    def agreed(value: int) -> int:
        return agreed_max(value, sharded, device)

    def sample(logits: torch.Tensor, first: int, rows_run: int) -> Iterator[Step]:
        """The next token of live rows first.. (their logits) and the Step of those running
        (yielded) -> what the rows feed the next step: the values when read (no tensor is then
        held while the next prompts prefill), else the tokens where they are."""
        items = live.items[first:]
        seen = None if live.seen is None else live.seen[first : first + len(items)]
        tokens = draw_next(logits, seen, items, len(prompts), generator, sampling)
        running = responses.running(items)
        step = step_of(logits, tokens, items, running, rows_run, readback=readback, eos_id=eos_id, logprobs=logprobs)
        yield step
        responses.advance(step.prompts, step.values)
        return step.values if step.values is not None and len(running) == len(items) else tokens

    def leave(tokens):  # step 3 (a compiled step's rows keep their places until all have ended)
        return live.leave(responses.running_mask(live.items), tokens, keep_places=compiled is not None)

    last = []  # the tokens the live rows feed the next step
    try:
        while True:
            wave = [waiting.popleft() for _ in range(min(rows - len(live), len(waiting)))]
            first, logits = len(live), []
            for n in range(agreed(len(wave))):  # step 1
                if n < len(wave):
                    logits.append(live.prefill(model, wave[n], prompts[wave[n]], device))
                else:
                    idle_forward(model, pad_id, device)
            if wave:
                last = joined(last, (yield from sample(torch.cat(logits), first, 0)))
            last = leave(last)
            if not agreed(int(any(responses.running_mask(live.items)) or bool(waiting))):
                break
            if not len(live):
                idle_forward(model, pad_id, device)
                continue
            logits = live.step(model, last, device, compiled)  # step 2
            last = leave((yield from sample(logits, 0, rows)))
    finally:
        if isinstance(model, FSDPModule):
            model.reshard()  # see the module docstring


class Responses:
    """How far each prompt's response has gone in decode_steps: the tokens it has drawn, and
    whether it has ended (eos, or max_new_tokens)."""

    def __init__(self, count: int, max_new_tokens: int, eos_id: int | None):
        self.drawn, self.ended = [0] * count, [False] * count
        self.max_new_tokens, self.eos_id = max_new_tokens, eos_id

    def running_mask(self, items: list[int]) -> list[bool]:
        """For each of `items` (prompt indices, in row order): whether its response goes on."""
        return [not self.ended[i] for i in items]

    def running(self, items: list[int]) -> list[int]:
        """The positions in `items` of those whose response goes on."""
        return [r for r, going in enumerate(self.running_mask(items)) if going]

    def advance(self, prompts: list[int], values: list[int] | None):
        """`prompts` drew one token each (`values`, when read back): count it, and end those done."""
        for n, i in enumerate(prompts):
            self.drawn[i] += 1
            self.ended[i] = self.drawn[i] == self.max_new_tokens or (values is not None and values[n] == self.eos_id)


def step_of(logits, tokens, items, running, rows, *, readback, eos_id, logprobs: bool) -> Step:
    """The Step of rows `running` (positions in `items`, `tokens` and `logits`, the rows' prompt
    indices, drawn tokens and logits): their tokens read back when an eos is looked for (or
    through `readback`), and their log-probs when asked."""
    everyone = len(running) == len(items)
    mine = tokens if everyone else tokens[running]
    prompts = [items[r] for r in running]
    values = None
    if readback is not None:
        values = readback(mine, prompts)
    elif eos_id is not None:
        values = mine.tolist()
    lps = token_logprobs(logits if everyone else logits[running], mine) if logprobs else None
    return Step(prompts, mine, lps, values, rows)


def cache_columns(config, prompts: list[list[int]], max_new_tokens: int, static: bool) -> int:
    """The KV cache's columns for `prompts` and their responses; a static cache (a compiled
    step) in whole buckets of STATIC_BUCKET, so that one compilation serves many lengths."""
    columns = max(map(len, prompts), default=1) + max_new_tokens
    if columns > config.max_position_embeddings:
        raise ValueError(
            f"prompt ({columns - max_new_tokens} tokens) + max_new_tokens ({max_new_tokens}) "
            f"exceeds the model's context of {config.max_position_embeddings}"
        )
    return min(-(-columns // STATIC_BUCKET) * STATIC_BUCKET, config.max_position_embeddings) if static else columns


def agreed_max(value: int, sharded: bool, device) -> int:
    """The largest `value` over the ranks of a sharded model (an all-reduce), else `value`."""
    if not sharded:
        return value
    t = torch.tensor(value, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t)


def draw_next(logits, seen, items: list[int], total: int, generator, sampling: dict) -> torch.Tensor:
    """The next token of the rows holding prompts `items` (of `total`), from their logits:
    process_logits with `sampling`, then draw, from the prompts' own generators (a list) or the
    batch's one (each prompt's seat its noise row); the rows' `seen` ids take them."""
    scores = process_logits(logits, seen, **sampling)
    if isinstance(generator, list):
        tokens = draw(scores, sampling["temperature"], [generator[i] for i in items])
    else:
        tokens = draw(scores, sampling["temperature"], generator, seats=(items, total))
    if seen is not None:
        seen.scatter_(1, tokens[:, None], True)
    return tokens


def joined(last: list[int] | torch.Tensor, new: list[int] | torch.Tensor) -> list[int] | torch.Tensor:
    """The tokens of the rows there were, then of those that joined: a list while both are
    values read back, else a tensor on the device."""
    if isinstance(last, list) and isinstance(new, list):
        return last + new
    device = (new if isinstance(new, torch.Tensor) else last).device
    return torch.cat([torch.as_tensor(last, dtype=torch.long, device=device), torch.as_tensor(new, device=device)])


def idle_forward(model, pad_id: int, device):
    """A one-token forward of nothing: a rank with no row to run takes part in the collectives
    of a sharded model's forward all the same."""
    model(torch.full((1, 1), pad_id, device=device), cache=KVCache(model.config, 1, 1), start=0)


def draw(scores: torch.Tensor, temperature: float, generator=None, seats: tuple[list[int], int] | None = None):
    """The next tokens (B,) from processed logits (B, V) (process_logits): the argmax at
    temperature 0, else one draw a row. From a list of generators, each row from its own (a
    seeded row then draws the same tokens whatever else is in the batch). From one generator
    with `seats` (each row's seat, of how many): the exponential race torch.multinomial runs for
    one draw (argmax of probs / Exp(1) noise, a noise row per seat, in one tensor), so that a
    batch draws the same tokens whether its ended rows still run or have left."""
    if temperature <= 0:
        return scores.argmax(-1)
    probs = scores.softmax(-1)
    if isinstance(generator, list):
        return torch.cat([torch.multinomial(p[None], 1, generator=g)[0] for p, g in zip(probs, generator)])
    if seats is None:
        return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
    taken, total = seats
    noise = probs.new_empty(total, probs.shape[-1]).exponential_(1, generator=generator)
    if taken != list(range(total)):
        noise = noise[torch.tensor(taken, device=probs.device)]
    return (probs / noise).argmax(-1)


class CacheRows:
    """Sequences decoding together in the rows of one KV cache, each at its own length (a cache
    column per row: model.KVCache's (B, 1) start): decode_steps' queue and serve.py's requests.
    Rows 0 .. n-1 are the live ones. A row is what decodes in it (`items`: a prompt's index, the
    server's Row), the cache columns it has filled (`lengths`) and, when repetition is
    penalised, the ids it has seen (`seen`, bool (rows, vocab)). A sequence joins with its
    prompt's keys and values (add), every live one takes a step at once (step), and those that
    ended leave, the rows after them moving down (keep). All of a row changes together, so no
    path (a failed step among them: clear) can leave a row's columns behind for the next
    sequence to attend to."""

    def __init__(self, config, rows: int, columns: int, vocab: int | None = None):
        self.cache, self.cache_config = KVCache(config, rows, columns), config
        self.items, self.lengths = [], []
        self.rows, self.vocab, self.seen = rows, vocab, None  # seen: allocated at the first add

    def __len__(self) -> int:
        return len(self.items)

    def add(self, item, prefill: KVCache, length: int, ids: list[int] | None = None):
        """`item` joins as the last row, its first `length` columns those of `prefill`'s row 0
        (its prompt's, prefilled alone), and `ids` (the prompt) the ids it has seen."""
        row = len(self.items)
        self.cache.copy_row(row, prefill, 0, length)
        if self.vocab is not None:
            device = prefill.k[0].device
            if self.seen is None:
                self.seen = torch.zeros(self.rows, self.vocab, dtype=torch.bool, device=device)
            self.seen[row] = False
            self.seen[row, torch.tensor(ids, device=device)] = True
        self.items.append(item)
        self.lengths.append(length)

    def prefill(self, model, item, ids: list[int], device) -> torch.Tensor:
        """`item` joins with its prompt `ids`, prefilled alone into a cache of its own (freed
        when this returns, not held through the next forward) -> its last logits (1, V)."""
        cache = KVCache(self.cache_config, 1, len(ids))
        logits = model(torch.tensor([ids], device=device), cache=cache, start=0, positions=slice(-1, None))
        self.add(item, cache, len(ids), ids)
        return logits[:, -1]

    def leave(self, stays: list[bool], tokens, keep_places: bool = False):
        """The rows whose `stays` is False leave (keep), unless `keep_places` and some stay ->
        `tokens` (a list, or a tensor (B,): what each row feeds its next step) of those left."""
        if all(stays) or (keep_places and any(stays)):
            return tokens
        self.keep(stays)
        if isinstance(tokens, list):
            return [t for t, s in zip(tokens, stays) if s]
        return tokens[[r for r, s in enumerate(stays) if s]]

    def step(self, model, tokens, device, compiled: "CompiledStep | None" = None) -> torch.Tensor:
        """Every live row's next token (`tokens`: a list, or a tensor (B,)) written at its own
        length, each attending to its own columns only -> the logits of what follows, (B, V).
        Through `compiled` the mask spans the whole static cache, so every step has one shape."""
        start = torch.tensor([[n] for n in self.lengths], device=device)  # (B, 1): a column each
        width = self.cache.max_len if compiled is not None else max(self.lengths) + 1
        mask = torch.arange(width, device=device)[None] <= start
        tokens = torch.as_tensor(tokens, device=device).view(len(self.items), 1)
        logits = (model if compiled is None else compiled.forward)(tokens, mask, cache=self.cache, start=start)
        self.lengths = [n + 1 for n in self.lengths]
        return logits[:, -1]

    def keep(self, keep: list[bool]):
        """The rows whose `keep` is False leave; the others move down, in order."""
        items, lengths = [], []
        for row, (item, length, stays) in enumerate(zip(self.items, self.lengths, keep)):
            if stays:
                if row != len(items):
                    self.cache.copy_row(len(items), self.cache, row, length)
                    if self.seen is not None:
                        self.seen[len(items)] = self.seen[row]
                items.append(item)
                lengths.append(length)
        self.items, self.lengths = items, lengths

    def clear(self):
        """Every row leaves (a step that failed): the next sequence starts at row 0, column 0."""
        self.items, self.lengths = [], []


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


@torch.no_grad()
def generate(
    model: Transformer,
    prompts: list[list[int]],
    *,
    max_new_tokens: int,
    eos_id: int | None,
    return_logprobs: bool = False,
    **options,
) -> Generation:
    """Sample continuations of `prompts`: all at once, or `rows` at a time through the queue;
    see decode_steps for the options."""
    out, lps, finished = [[] for _ in prompts], [[] for _ in prompts], [False] * len(prompts)
    row_steps = used = 0
    steps = decode_steps(
        model, prompts, max_new_tokens=max_new_tokens, eos_id=eos_id, logprobs=return_logprobs, **options
    )
    for step in steps:
        values = step.values if step.values is not None else step.tokens.tolist()
        logprobs = step.logprobs.tolist() if return_logprobs else None
        for n, i in enumerate(step.prompts):
            out[i].append(values[n])
            finished[i] = values[n] == eos_id
            if logprobs is not None:
                lps[i].append(logprobs[n])
        if step.rows:
            row_steps, used = row_steps + step.rows, used + len(step.prompts)
        del step  # not held through the next forward (a rollout's peak is its first wave's)
    idle = 1 - used / row_steps if row_steps else 0.0
    return Generation(out, lps if return_logprobs else None, finished, idle)


@torch.no_grad()
def stream(model: Transformer, prompt: list[int], *, max_new_tokens: int, eos_id: int, **options) -> Iterator[int]:
    """Yield the new tokens of one prompt as they are sampled (for chat); stops after eos."""
    for step in decode_steps(model, [prompt], max_new_tokens=max_new_tokens, eos_id=eos_id, **options):
        yield step.values[0] if step.values is not None else int(step.tokens[0])


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
