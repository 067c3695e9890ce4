"""model.py against transformers' LlamaForCausalLM: one training step and decoding speed; and
the training step against its matmul ceiling.

Both models get the same ~50M-parameter config and the same weights (fp32). Runs alternate
(ours, theirs, ours, ...) and the median of each is kept, so a noisy shared machine hurts both
alike; the figures that matter are the ratios printed at the end.

The ceiling: the matrix products one training step has to do, timed alone in the same run on
random tensors of the same shapes. For each linear layer (7 per block and the head) the
forward product and the backward's two (input gradient, weight gradient); for attention the
two forward and four backward batched products at full length (causal attention needs only
half of them, so this ceiling is generous to the step). What the step spends beyond it is
everything else: norms, RoPE, SwiGLU, softmax, the loss, the optimizer, autograd.

    python bench/bench_model.py [--threads 2] [--repeats 5]
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from generate import generate  # noqa: E402
from model import CONFIGS, Transformer  # noqa: E402
from pretrained import config_to_hf  # noqa: E402


def reference_pair(config):
    from transformers import LlamaConfig, LlamaForCausalLM

    ours = Transformer.from_config(config, seed=0)
    hf = LlamaForCausalLM(LlamaConfig(**config_to_hf(config), attn_implementation="sdpa"))
    hf.load_state_dict({("" if k.startswith("lm_head") else "model.") + k: v for k, v in ours.state_dict().items()})
    return ours, hf


def train_step_fn(model, is_hf, batch, seq):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    tokens = torch.randint(3, model.config.vocab_size, (batch, seq + 1), generator=torch.Generator().manual_seed(0))
    x, y = tokens[:, :-1], tokens[:, 1:]

    def step():
        logits = model(x).logits if is_hf else model(x)
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return batch * seq

    return step


def ceiling_fn(config, batch, seq):
    """(run, flops): the step's matrix products alone, and their floating-point operations."""
    n, d, hd = batch * seq, config.hidden_size, config.head_dim
    heads, kv = config.num_attention_heads, config.num_key_value_heads
    linears = [
        (heads * hd, d),
        (kv * hd, d),
        (kv * hd, d),
        (d, heads * hd),  # q k v o
        (config.intermediate_size, d),
        (config.intermediate_size, d),
        (d, config.intermediate_size),
    ]
    linears = linears * config.num_hidden_layers + [(config.vocab_size, d)]
    g = torch.Generator().manual_seed(0)
    ws = {shape: torch.randn(shape, generator=g) for shape in set(linears)}
    xs = {i: torch.randn(n, i, generator=g) for i in {s[1] for s in linears} | {s[0] for s in linears}}
    q, k = torch.randn(batch * heads, seq, hd, generator=g), torch.randn(batch * heads, seq, hd, generator=g)
    p = torch.randn(batch * heads, seq, seq, generator=g)
    flops = (
        sum(3 * 2 * n * o * i for o, i in linears) + config.num_hidden_layers * 6 * 2 * batch * heads * seq * seq * hd
    )

    def run():
        for o, i in linears:
            w, x, dy = ws[(o, i)], xs[i], xs[o]
            x @ w.T  # forward
            dy @ w  # gradient of the input
            dy.T @ x  # gradient of the weight
        for _ in range(config.num_hidden_layers):
            for _ in range(3):  # forward: QK^T, PV; backward: 4 more of these two shapes
                torch.bmm(q, k.transpose(1, 2))
                torch.bmm(p, k)
        return flops

    return run, flops


def decode_fn(model, is_hf, batch, prompt_len, new_tokens):
    prompts = torch.randint(3, model.config.vocab_size, (batch, prompt_len), generator=torch.Generator().manual_seed(1))

    @torch.no_grad()
    def run():
        if is_hf:
            out = model.generate(
                prompts,
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                do_sample=False,
                eos_token_id=None,
                pad_token_id=0,
            )
            assert out.shape[1] == prompt_len + new_tokens
        else:
            out = generate(model, prompts.tolist(), max_new_tokens=new_tokens, eos_id=-1, temperature=0)
            assert all(len(t) == new_tokens for t in out.tokens)
        return batch * new_tokens

    return run


def timed(fn):
    t = time.perf_counter()
    n = fn()
    return n / (time.perf_counter() - t)


def compare(name, ours_fn, hf_fn, repeats):
    ours_fn(), hf_fn()  # warm-up
    ours, theirs = [], []
    for _ in range(repeats):
        ours.append(timed(ours_fn))
        theirs.append(timed(hf_fn))
    o, h = statistics.median(ours), statistics.median(theirs)
    print(f"{name:28s} model.py {o:10.1f} tok/s   transformers {h:10.1f} tok/s   ratio {o / h:5.2f}x")
    return o / h


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=256)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    config = CONFIGS["bench-50m"]
    ours, hf = reference_pair(config)
    print(
        f"config bench-50m: {config.num_params() / 1e6:.1f}M parameters, fp32, {args.threads} threads, "
        f"torch {torch.__version__}"
    )
    ours.train(), hf.train()
    ratios = {
        "train": compare(
            f"train step (B={args.batch}, T={args.seq})",
            train_step_fn(ours, False, args.batch, args.seq),
            train_step_fn(hf, True, args.batch, args.seq),
            args.repeats,
        )
    }
    ceiling, flops = ceiling_fn(config, args.batch, args.seq)
    step = train_step_fn(ours, False, args.batch, args.seq)
    steps, ceilings = [], []
    ceiling()
    for _ in range(args.repeats):
        steps.append(1 / timed(step) * args.batch * args.seq)
        ceilings.append(1 / timed(ceiling) * flops)
    s, c = statistics.median(steps), statistics.median(ceilings)
    print(
        f"{'train step vs. its matmuls':28s} step {s:6.2f} s   matrix products alone {c:6.2f} s "
        f"({flops / 1e9:.0f} GFLOP, {flops / c / 1e9:.0f} GFLOP/s)   step / ceiling {s / c:4.2f}x"
    )
    ratios["train/ceiling"] = s / c
    ours.eval(), hf.eval()
    for b in (1, 8):
        ratios[f"decode{b}"] = compare(
            f"decode (B={b}, 128 new)",
            decode_fn(ours, False, b, 32, 128),
            decode_fn(hf, True, b, 32, 128),
            args.repeats,
        )
    print(
        "ratios (model.py / transformers, and the step / its ceiling): "
        + ", ".join(f"{k} {v:.2f}x" for k, v in ratios.items())
    )


if __name__ == "__main__":
    main()
