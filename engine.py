"""The serving engine: one worker thread owns the model and schedules at every step.

A request that arrives while others decode joins them at the next step, in one of --max-batch
rows of one KV cache (generate.CacheRows: a row's request and its cache columns, changed only
together), with its own temperature, top_p, seed, stop strings and max_tokens; a long prompt is
prefilled a chunk a step; a reply that ends frees its row at once. A request is a Job; the
handler that submitted it reads its events from the job's queue. docs/serving.md explains it;
protocol.py checks what comes in, serve.py speaks HTTP.
"""

from __future__ import annotations

import queue
import threading
from collections import deque
from dataclasses import dataclass, field

import torch

from generate import CacheRows, ReplyText, draw, process_logits
from model import KVCache, Transformer, at_least_fp32
from tokenizer import Tokenizer

from protocol import BadRequest, Request


def token_bytes(tok: Tokenizer, i: int) -> bytes:
    """The bytes a token stands for: a byte-fallback piece (<0xE5>) its byte, a piece's ▁ a
    space, a control token (bos, eos) none."""
    piece = tok.sp.id_to_piece(i)
    if tok.sp.is_byte(i):
        return bytes([int(piece[3:-1], 16)])
    if tok.sp.is_control(i):
        return b""
    return piece.replace("\u2581", " ").encode("utf-8")


# Prompt tokens prefilled a step at most while rows decode, which wait for each chunk: on a GPU a
# chunk of 256 costs about one decoding step (both read every weight once); a CPU computes a
# chunk's every token, so there a smaller one keeps the rows' pace (bench/bench_serve.py).
PREFILL_CHUNK = {"cuda": 256, "cpu": 32}


# What a job's handler reads from its queue, in this order: Text and Finished for each choice,
# then Done; or Failed, after which nothing follows. logprobs: the entries of the tokens sampled
# since the choice's last event (None unless the request asked for them).


@dataclass(frozen=True)
class Text:
    choice: int
    text: str
    logprobs: list | None


@dataclass(frozen=True)
class Finished:
    choice: int
    reason: str
    logprobs: list | None


@dataclass(frozen=True)
class Done:
    usage: dict


@dataclass(frozen=True)
class Failed:
    message: str


class Job:
    """A request in the engine: its events (Text, Finished, Done or Failed) on a queue its
    handler reads; `cancelled` once its client has left."""

    def __init__(self, request: Request):
        self.request = request
        self.events: queue.Queue = queue.Queue()
        self.cancelled = False
        self.usage: dict | None = None
        self.rows_left, self.completion = request.n, 0  # the engine's count of its rows still decoding


@dataclass
class Row:
    """One choice of one request, decoding in a row of the engine's KV cache."""

    job: Job
    choice: int
    reply: ReplyText
    generator: torch.Generator  # its own: a seeded reply is the same whatever else decodes beside it
    token: int = -1  # the last token it sampled, which the next step writes after its columns
    logprobs: list = field(default_factory=list)  # entries of tokens whose text has not been sent yet


@dataclass
class Prefill:
    """An admitted request whose prompt enters a cache of its own, a chunk a step."""

    job: Job
    cache: KVCache
    done: int = 0  # prompt tokens in the cache so far


class Engine:
    """Iteration-level scheduling (Orca's; vLLM's and nano-vllm's): one thread owns the model
    and a KV cache of --max-batch rows for the whole context (generate.CacheRows), and each step

      1. admits waiting requests, first come first served, while they fit in the free rows (a
         request takes a row for each of its n choices);
      2. prefills the next chunk (--prefill-chunk tokens at most) of the oldest admitted prompt
         in a cache of its own, or all of it when no row is decoding; a whole prompt's keys and
         values are copied into a free row for each choice, each of which samples its first
         token from the prompt's last logits;
      3. decodes one token for every row at once: each row writes its column at its own length
         (model.KVCache's column per row) and attends to its own columns only (the mask), and
         samples with its own request's temperature, top_p and generator (generate.process_logits
         for the rows that share settings, generate.draw a row from its own generator);
      4. streams each row's new text (ReplyText: stop strings, max_tokens) and frees the rows
         of a reply that ended or whose client left, at once, moving the last rows down so that
         the rows decoding are always the cache's first ones.

    A request that arrives while others decode joins them at the next step; a long prompt
    delays the rows decoding by one chunk a step, never by its whole prefill."""

    def __init__(
        self, model: Transformer, tok: Tokenizer, *, max_batch: int = 8, seed: int = 0, prefill_chunk: int | None = None
    ):
        self.model, self.tok, self.max_batch = model, tok, max_batch
        self.context = model.config.max_position_embeddings
        self.device = next(model.parameters()).device
        self.prefill_chunk = prefill_chunk or PREFILL_CHUNK.get(self.device.type, PREFILL_CHUNK["cuda"])
        self.live = CacheRows(model.config, max_batch, self.context)  # the Rows decoding, each with its cache row
        self.generator = torch.Generator(self.device).manual_seed(seed)  # for requests without a seed
        self.waiting: deque[Job] = deque()
        self.prefilling: deque[Prefill] = deque()
        self.cond = threading.Condition()
        self.steps = 0  # decoding steps run
        self.widths: deque[int] = deque(maxlen=4096)  # rows decoded at each recent step, for tests and logs
        self.abandoned = 0  # requests whose client left before the reply was done
        self.closing = False
        self.thread = threading.Thread(target=self._loop, name="engine", daemon=True)
        self.thread.start()

    @property
    def rows(self) -> list[Row]:
        """The rows decoding, in the cache's rows 0 .. len - 1."""
        return self.live.items

    def submit(self, request: Request) -> Job:
        """Queue a request; BadRequest for one that could never be admitted (first come, first
        served: it would hold every request behind it)."""
        if request.n > self.max_batch:
            raise BadRequest(
                f"'n' is {request.n}, but this server decodes at most {self.max_batch} sequences at once "
                "(its --max-batch)",
                "n",
            )
        job = Job(request)
        with self.cond:
            if self.closing:  # Ctrl-C came first: the engine takes no more work
                job.events.put(Failed("the server is stopping"))
                return job
            self.waiting.append(job)
            self.cond.notify()
        return job

    def row_seed(self, seed: int | None, choice: int) -> int:
        if seed is None:
            return int(torch.randint(0, 2**62, (1,), generator=self.generator))
        return seed % 2**63 if choice == 0 else (seed * 1_000_003 + choice) % 2**63

    def close(self, timeout: float = 30.0):
        """Stop between two steps: every request in flight or waiting hears that the server is
        stopping, and the thread ends (a thread left inside torch at exit aborts the process).
        Waits `timeout` seconds for that (0: returns at once; a second call waits again)."""
        with self.cond:
            self.closing = True
            self.cond.notify()
        self.thread.join(timeout)

    def _admit(self) -> bool:
        """Step 1; waits while there is nothing at all to do. False: the engine is closing."""
        with self.cond:
            while not (self.waiting or self.prefilling or self.rows or self.closing):
                self.cond.wait()
            if self.closing:
                return False
            free = self.max_batch - len(self.rows) - sum(p.job.request.n for p in self.prefilling)
            while self.waiting and self.waiting[0].request.n <= free:
                job = self.waiting.popleft()
                free -= job.request.n
                self.prefilling.append(Prefill(job, KVCache(self.model.config, 1, len(job.request.ids))))

        return True

    def _loop(self):
        while self._admit():
            try:
                self._step()
            except Exception as e:  # the model failed: every request in flight hears it, the server lives on
                self._end_in_flight(f"generation failed: {type(e).__name__}: {e}")
        with self.cond:
            waiting, self.waiting = list(self.waiting), deque()
        self._end_in_flight("the server is stopping", waiting)

    def _end_in_flight(self, message: str, also: list[Job] = ()):
        """Every request decoding or prefilling (and `also`) hears `message` and leaves: the rows
        with their cache columns (CacheRows.clear), so that the next request starts clean."""
        jobs = {id(j): j for j in [r.job for r in self.rows] + [p.job for p in self.prefilling] + list(also)}
        for job in jobs.values():
            job.events.put(Failed(message))
        self.live.clear()
        self.prefilling.clear()

    @torch.no_grad()
    def _step(self):
        if self.prefilling:
            self._prefill(self.prefilling[0])
        self._retire()
        if self.rows:
            self._decode()
            self._retire()

    def _prefill(self, p: Prefill):
        """Step 2."""
        request, job = p.job.request, p.job
        if job.cancelled:  # its client left before its reply began
            self.prefilling.popleft()
            job.rows_left = 0
            self._done(job)
            return
        # In chunks while rows decode (they wait for each); whole when none does.
        end = min(p.done + self.prefill_chunk, len(request.ids)) if self.rows else len(request.ids)
        chunk = torch.tensor([request.ids[p.done : end]], device=self.device)
        logits = self.model(chunk, cache=p.cache, start=p.done, positions=slice(-1, None))[0, -1]
        p.done = end
        if end < len(request.ids):
            return
        self.prefilling.popleft()
        for choice in range(request.n):
            generator = torch.Generator(self.device).manual_seed(self.row_seed(request.seed, choice))
            row = Row(job, choice, ReplyText(self.tok, request.stop, request.max_tokens), generator)
            self.live.add(row, p.cache, len(request.ids))
            self._sample([row], logits[None])

    def _decode(self):
        """Step 3."""
        logits = self.live.step(self.model, [row.token for row in self.rows], self.device)
        self.steps += 1
        self.widths.append(len(self.rows))
        self._sample(self.rows, logits)

    def _sample(self, rows: list[Row], logits: torch.Tensor):
        """Each row's next token from its logits (B, V), with its own request's settings: the
        rows that share them processed together (generate.process_logits), each drawing from
        its own generator (generate.draw); then step 4 for each."""
        groups: dict[tuple, list[int]] = {}
        for b, row in enumerate(rows):
            groups.setdefault((row.job.request.temperature, row.job.request.top_p), []).append(b)
        for (temperature, top_p), members in groups.items():
            scores = process_logits(
                logits[members], None, temperature=temperature, top_p=top_p, vocab_limit=len(self.tok)
            )
            tokens = draw(scores, temperature, [rows[b].generator for b in members]).tolist()
            for b, token in zip(members, tokens):
                rows[b].token = token
        for row, row_logits in zip(rows, logits):
            self._emit(row, row_logits)

    def _emit(self, row: Row, logits: torch.Tensor):
        """Step 4, for one row: the text its new token makes final (and its log-probabilities)."""
        request = row.job.request
        if request.logprobs and row.token != self.tok.eos_id:
            row.logprobs.append(self._logprob_entry(logits, row.token, request.top_logprobs))
        piece = row.reply.push(row.token, self.tok.eos_id)
        if piece:
            row.job.events.put(Text(row.choice, piece, self._take_logprobs(row)))
        if row.reply.finish is not None:
            row.job.events.put(Finished(row.choice, row.reply.finish, self._take_logprobs(row)))

    def _logprob_entry(self, logits: torch.Tensor, token: int, top: int) -> dict:
        """A token as OpenAI's logprobs.content lists it: the model's own log-probability of it
        (model.token_logprobs: the whole vocabulary, no sampling filter), and the `top` most
        likely tokens the tokenizer can decode, with theirs."""
        logprobs = at_least_fp32(logits).log_softmax(-1)

        def entry(i: int) -> dict:
            data = token_bytes(self.tok, i)
            return {
                "token": data.decode("utf-8", "backslashreplace"),
                "logprob": float(logprobs[i]),
                "bytes": list(data),
            }

        best = logprobs[: len(self.tok)].topk(top).indices.tolist() if top else []
        return dict(entry(token), top_logprobs=[entry(i) for i in best])

    def _take_logprobs(self, row: Row) -> list | None:
        if not row.job.request.logprobs:
            return None
        taken, row.logprobs = row.logprobs, []
        return taken

    def _retire(self):
        """Step 4: rows that ended or whose client left free their rows; the rest move down."""
        for row in self.rows:
            if row.reply.finish is None and row.job.cancelled:
                row.reply.finish = "cancelled"
        keep = [row.reply.finish is None for row in self.rows]
        for row in (row for row, stays in zip(self.rows, keep) if not stays):
            row.job.rows_left -= 1
            row.job.completion += row.reply.tokens
            if row.job.rows_left == 0:
                self._done(row.job)
        self.live.keep(keep)

    def _done(self, job: Job):
        if job.cancelled:
            self.abandoned += 1
        prompt = len(job.request.ids)
        usage = {"prompt_tokens": prompt, "completion_tokens": job.completion, "total_tokens": prompt + job.completion}
        job.events.put(Done(usage))
