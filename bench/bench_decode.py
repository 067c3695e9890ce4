"""Decoding against its floor: how much of a decoding step is the weight reads, and how much is
everything else (masks, RoPE, cache bookkeeping, sampling, Python).

At batch 1 a decoding step multiplies one vector by each of the model's 85 weight matrices
(12 blocks x 7, and the head): on a CPU that is bound by reading the weights from memory. The
floor is those 85 products alone, in a loop, on the same shapes, in the same run; the step is
`generate.decode_steps`' time per new token after the prefill. Their ratio is the overhead
(1.00 would be no overhead at all). At batch 8 the step is also compared with transformers'
`generate` on the same weights. Each is timed eagerly and compiled (--compile: the step through
torch.compile over a static cache, generate.CompiledStep; its compilation is timed apart).
Runs alternate and medians are kept.

    python bench/bench_decode.py [--threads 2] [--repeats 5] [--new-tokens 128] [--no-compile]
"""

import argparse
import contextlib
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from generate import CompiledStep, decode_steps  # noqa: E402
from model import CONFIGS, Transformer  # noqa: E402
from pretrained import config_to_hf  # noqa: E402


def floor_fn(model, batch):
    """The step's weight reads and nothing else: x @ W.T for every matrix, x of the batch's size."""
    weights = [m.weight for m in model.modules() if isinstance(m, torch.nn.Linear)]
    xs = {w.shape[1]: torch.randn(batch, w.shape[1]) for w in weights}

    @torch.no_grad()
    def run():
        for w in weights:
            F.linear(xs[w.shape[1]], w)

    return run, len(weights)


def step_fn(model, batch, prompt_len, new_tokens):
    """Seconds per decoding step of decode_steps (greedy), the prefill excluded."""
    prompts = torch.randint(
        3, model.config.vocab_size, (batch, prompt_len), generator=torch.Generator().manual_seed(1)
    ).tolist()

    @torch.no_grad()
    def run():
        steps = decode_steps(
            model, prompts, max_new_tokens=new_tokens, eos_id=-1, temperature=0, compiled=DECODING["compiled"]
        )
        next(steps)  # the prefill and the first token
        t = time.perf_counter()
        n = sum(1 for _ in steps)
        return (time.perf_counter() - t) / n

    return run


def hf_step_fn(model, batch, prompt_len, new_tokens):
    """transformers' generate, per new token (its prefill included: one step of new_tokens)."""
    prompts = torch.randint(3, model.config.vocab_size, (batch, prompt_len), generator=torch.Generator().manual_seed(1))

    @torch.no_grad()
    def run():
        t = time.perf_counter()
        model.generate(
            prompts,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
        )
        return (time.perf_counter() - t) / new_tokens

    return run


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--no-transformers", action="store_true", help="skip the comparison at batch 8")
    p.add_argument("--no-compile", action="store_true", help="skip the compiled step (--compile)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    config = CONFIGS["bench-50m"]
    model = Transformer.from_config(config, seed=0).eval()
    print(
        f"bench-50m: {config.num_params() / 1e6:.1f}M parameters, fp32, {args.threads} threads, torch {torch.__version__}"
    )
    modes = ["eager"] + ([] if args.no_compile else ["compiled"])
    for batch in (1, 8):
        floor, n_mats = floor_fn(model, batch)
        step = step_fn(model, batch, args.prompt_len, args.new_tokens)
        for mode in modes:  # warm up (the first compiled run compiles)
            with compiled(model, mode == "compiled"):
                t = time.perf_counter()
                step()
                if mode == "compiled":
                    print(f"batch {batch}: compiling the step took {time.perf_counter() - t:.0f} s")

        def floor_s():
            t = time.perf_counter()
            for _ in range(20):
                floor()
            return (time.perf_counter() - t) / 20

        times = alternate(model, modes, args.repeats, floor_s, step)
        f = times["reference"]
        print(
            f"batch {batch}: floor ({n_mats} products) {f * 1e3:6.2f} ms   "
            + "   ".join(f"{mode} step {times[mode] * 1e3:6.2f} ms = {times[mode] / f:4.2f}x floor" for mode in modes)
        )
        if batch == 8 and not args.no_transformers:
            from transformers import LlamaConfig, LlamaForCausalLM

            hf = LlamaForCausalLM(LlamaConfig(**config_to_hf(config), attn_implementation="sdpa")).eval()
            hf.load_state_dict(
                {("" if k.startswith("lm_head") else "model.") + k: v for k, v in model.state_dict().items()}
            )
            theirs = hf_step_fn(hf, batch, args.prompt_len, args.new_tokens)
            ours = hf_like_fn(model, batch, args.prompt_len, args.new_tokens)
            theirs()
            times = alternate(model, modes, args.repeats, theirs, ours)
            h = times["reference"]
            print(
                f"batch {batch}: generate per token, transformers {h * 1e3:6.2f} ms   "
                + "   ".join(
                    f"model.py {mode} {times[mode] * 1e3:6.2f} ms = {h / times[mode]:4.2f}x as fast" for mode in modes
                )
            )


def alternate(model, modes, repeats, reference, ours):
    """Median seconds of `reference` and of `ours` in each mode, the runs alternating so that a
    noisy neighbour hurts all alike."""
    times = {"reference": [], **{m: [] for m in modes}}
    for _ in range(repeats):
        times["reference"].append(reference())
        for mode in modes:
            with compiled(model, mode == "compiled"):
                times[mode].append(ours())
    return {k: statistics.median(v) for k, v in times.items()}


DECODING = {"compiled": None}  # the CompiledStep the timed calls decode through, None: eager
COMPILED = {}  # one CompiledStep a model, kept across the runs (compiled once)


@contextlib.contextmanager
def compiled(model, on: bool):
    """Decode through the model's generate.CompiledStep (what --compile makes) inside the block."""
    if on and id(model) not in COMPILED:
        COMPILED[id(model)] = CompiledStep(model)
    DECODING["compiled"] = COMPILED[id(model)] if on else None
    try:
        yield
    finally:
        DECODING["compiled"] = None


def hf_like_fn(model, batch, prompt_len, new_tokens):
    """Our generate timed as hf_step_fn times transformers' (prefill included)."""
    from generate import generate

    prompts = torch.randint(
        3, model.config.vocab_size, (batch, prompt_len), generator=torch.Generator().manual_seed(1)
    ).tolist()

    def run():
        t = time.perf_counter()
        generate(model, prompts, max_new_tokens=new_tokens, eos_id=-1, temperature=0, compiled=DECODING["compiled"])
        return (time.perf_counter() - t) / new_tokens

    return run


if __name__ == "__main__":
    main()
