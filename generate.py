"""Batched sampling from model.py's Transformer with a preallocated KV cache.

Prompts of different lengths are left-padded so that they end in the same column: the prefill
writes one block of the cache and each decoding step one more column for the whole batch.
Positions count real tokens only (model.Transformer.context), so a prompt decodes the same
alone as inside a padded batch. A sequence that has produced eos keeps stepping (the batch moves
together) but its later tokens are padding and are not returned.

    python generate.py --model DIR --prompt "我最近总是失眠，怎么办？" --max-new-tokens 128
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.nn.functional as F

from model import KVCache, Transformer


@dataclass
class Generation:
    tokens: list[list[int]]  # new tokens per prompt, the final eos included when one was produced
    logprobs: list[list[float]] | None  # log p(token) under the model (temperature 1, no filters)
    finished: list[bool]  # True where the sequence ended with eos rather than at max_new_tokens


def process_logits(logits: torch.Tensor, seen: torch.Tensor | None, *, temperature: float = 1.0,
                   top_k: int | None = None, top_p: float | None = None,
                   repetition_penalty: float = 1.0) -> torch.Tensor:
    """Raw logits (B, V) -> the logits actually sampled from, in transformers' order:
    repetition penalty, then temperature, then top-k, then top-p."""
    logits = logits.float()
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


def decode_steps(model: Transformer, prompts: list[list[int]], *, max_new_tokens: int, eos_id: int,
                 pad_id: int = 0, temperature: float = 1.0, top_k: int | None = None,
                 top_p: float | None = None, repetition_penalty: float = 1.0,
                 vocab_limit: int | None = None, generator: torch.Generator | None = None,
                 ) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Yield, per step, (tokens (B,), logprobs (B,), alive (B,) bool) for the batch.

    `alive` is False for sequences that had already finished before this step; their token is
    padding. temperature 0 is greedy decoding. vocab_limit masks ids the tokenizer cannot decode
    (Ziya's embedding has 14 more rows than its tokenizer has pieces).
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token (the bos token, at least)")
    config = model.config
    param = next(model.parameters())
    device, dtype = param.device, param.dtype
    B, P = len(prompts), max(len(p) for p in prompts)
    if P + max_new_tokens > config.max_position_embeddings:
        raise ValueError(f"prompt ({P} tokens) + max_new_tokens ({max_new_tokens}) "
                         f"exceeds the model's context of {config.max_position_embeddings}")
    total = P + max_new_tokens
    tokens = torch.full((B, total), pad_id, dtype=torch.long, device=device)
    mask = torch.zeros((B, total), dtype=torch.long, device=device)
    for i, p in enumerate(prompts):
        tokens[i, P - len(p):P] = torch.tensor(p, dtype=torch.long)
        mask[i, P - len(p):P] = 1
    padded = bool((mask[:, :P] == 0).any())
    seen = None
    if repetition_penalty != 1.0:
        seen = torch.zeros((B, config.vocab_size), dtype=torch.bool, device=device)
        seen.scatter_(1, tokens[:, :P], mask[:, :P].bool())
    cache = KVCache(config, B, total, dtype, device)
    alive = torch.ones(B, dtype=torch.bool, device=device)

    logits = model(tokens[:, :P], mask[:, :P] if padded else None, cache=cache, start=0)[:, -1]
    for step in range(max_new_tokens):
        if vocab_limit is not None:
            logits[:, vocab_limit:] = float("-inf")
        scores = process_logits(logits, seen, temperature=temperature, top_k=top_k, top_p=top_p,
                                repetition_penalty=repetition_penalty)
        if temperature <= 0:
            nxt = scores.argmax(-1)
        else:
            nxt = torch.multinomial(scores.softmax(-1), 1, generator=generator).squeeze(-1)
        logprob = F.log_softmax(logits.float(), dim=-1).gather(-1, nxt[:, None]).squeeze(-1)
        nxt = torch.where(alive, nxt, torch.full_like(nxt, pad_id))
        pos = P + step
        tokens[:, pos] = nxt
        mask[:, pos] = 1
        if seen is not None:
            seen.scatter_(1, nxt[:, None], alive[:, None])
        yield nxt, logprob, alive.clone()
        alive &= nxt != eos_id
        if not alive.any() or step == max_new_tokens - 1:
            break
        logits = model(tokens[:, pos:pos + 1], mask[:, :pos + 1] if padded else None,
                       cache=cache, start=pos)[:, -1]


@torch.inference_mode()
def generate(model: Transformer, prompts: list[list[int]], *, max_new_tokens: int, eos_id: int,
             return_logprobs: bool = False, **sampling) -> Generation:
    """Sample continuations of a batch of prompts; see decode_steps for the options."""
    out = [[] for _ in prompts]
    lps = [[] for _ in prompts]
    finished = [False] * len(prompts)
    for tokens, logprobs, alive in decode_steps(model, prompts, max_new_tokens=max_new_tokens,
                                                eos_id=eos_id, **sampling):
        for i in alive.nonzero().flatten().tolist():
            out[i].append(int(tokens[i]))
            lps[i].append(float(logprobs[i]))
            finished[i] = int(tokens[i]) == eos_id
    return Generation(out, lps if return_logprobs else None, finished)


@torch.inference_mode()
def stream(model: Transformer, prompt: list[int], *, max_new_tokens: int, eos_id: int,
           **sampling) -> Iterator[int]:
    """Yield the new tokens of one prompt as they are sampled (for chat); stops after eos."""
    for tokens, _, _ in decode_steps(model, [prompt], max_new_tokens=max_new_tokens, eos_id=eos_id, **sampling):
        yield int(tokens[0])


def main(argv=None):
    from tokenizer import StreamDecoder, Tokenizer

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="an HF-format directory with tokenizer.model")
    p.add_argument("--prompt", required=True, help="raw text, encoded with bos (no chat template)")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=0.9)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    model = Transformer.from_pretrained(args.model).eval()
    tok = Tokenizer(f"{args.model}/tokenizer.model")
    tok.check_model_vocab(model.config.vocab_size)
    decoder = StreamDecoder(tok)
    for t in stream(model, tok.encode(args.prompt, bos=True), max_new_tokens=args.max_new_tokens,
                    eos_id=tok.eos_id, pad_id=tok.pad_id, temperature=args.temperature, top_k=args.top_k,
                    top_p=args.top_p, repetition_penalty=args.repetition_penalty, vocab_limit=len(tok),
                    generator=torch.Generator().manual_seed(args.seed)):
        print(decoder.push(t), end="", flush=True)
    print()


if __name__ == "__main__":
    sys.exit(main())
