"""The embedded default, end to end on a laptop CPU: no downloads, no API key.

    python quickstart.py [--out runs/quickstart] [--steps 300]

1. trains a small sentencepiece tokenizer on the corpus shipped in data/corpus/;
2. trains the `tiny` LLaMA (model.CONFIGS) briefly as a language model on that corpus,
   printing the held-out loss as it falls;
3. saves it in the Hugging Face layout, loads it back, and samples a reply with the KV cache.

This is the first stage of the pipeline; supervised fine-tuning with the chat template,
the reward model and PPO build on the same pieces.
"""

import argparse
import json
import math
import random
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from generate import generate
from model import CONFIGS, Transformer
from tokenizer import Tokenizer, corpus_sentences, train_tokenizer

ROOT = Path(__file__).resolve().parent
SPEAKER = {"user": "病人：", "assistant": "医生："}


def conversation_ids(tok: Tokenizer, record: dict) -> list[int]:
    """bos, then each turn as '病人：…' / '医生：…' on its own line, then eos."""
    text = "\n".join(SPEAKER[m["role"]] + m["content"] for m in record["messages"])
    return tok.encode(text, bos=True, eos=True)


def batches(stream: list[int], seq_len: int, batch_size: int, gen: torch.Generator):
    """Random windows of seq_len + 1 tokens from one long token stream."""
    data = torch.tensor(stream)
    while True:
        starts = torch.randint(0, len(data) - seq_len - 1, (batch_size,), generator=gen)
        chunk = torch.stack([data[s:s + seq_len + 1] for s in starts.tolist()])
        yield chunk[:, :-1], chunk[:, 1:]


@torch.no_grad()
def held_out_loss(model, stream: list[int], seq_len: int) -> float:
    data = torch.tensor(stream)
    n = (len(data) - 1) // seq_len
    x = data[: n * seq_len].view(n, seq_len)
    y = data[1: n * seq_len + 1].view(n, seq_len)
    return F.cross_entropy(model(x).flatten(0, 1), y.flatten()).item()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "quickstart")
    p.add_argument("--corpus", nargs="+", default=sorted(str(f) for f in (ROOT / "data" / "corpus").glob("*.jsonl")))
    p.add_argument("--vocab-size", type=int, default=2048, help="an upper bound; mostly single characters")
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    torch.manual_seed(args.seed)
    t0 = time.time()

    tok = train_tokenizer(corpus_sentences(args.corpus), args.out / "tokenizer.model", vocab_size=args.vocab_size)
    print(f"[1/3] tokenizer: {len(tok)} pieces trained on {len(args.corpus)} files")

    records = [json.loads(line) for f in args.corpus for line in open(f, encoding="utf-8") if line.strip()]
    random.Random(args.seed).shuffle(records)
    n_val = max(1, len(records) // 10)
    val = [t for r in records[:n_val] for t in conversation_ids(tok, r)]
    train = [t for r in records[n_val:] for t in conversation_ids(tok, r)]

    config = CONFIGS["tiny"]
    tok.check_model_vocab(config.vocab_size)
    model = Transformer.from_config(config, seed=args.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.1, betas=(0.9, 0.95))
    gen = torch.Generator().manual_seed(args.seed)
    print(f"[2/3] training the tiny model ({config.num_params() / 1e6:.1f}M parameters) on "
          f"{len(train)} tokens, holding out {len(val)}; loss of a uniform guess: {math.log(len(tok)):.2f}")
    model.eval()
    best = (held_out_loss(model, val, args.seq_len), 0, None)
    print(f"      step    0  held-out loss {best[0]:.3f}")
    for step, (x, y) in zip(range(1, args.steps + 1), batches(train, args.seq_len, args.batch_size, gen)):
        model.train()
        lr = args.lr * min(1.0, step / 20) * 0.5 * (1 + math.cos(math.pi * step / args.steps))
        for group in opt.param_groups:
            group["lr"] = lr
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step % 15 == 0 or step == args.steps:
            model.eval()
            val_loss = held_out_loss(model, val, args.seq_len)
            print(f"      step {step:4d}  train loss {loss.item():.3f}  held-out loss {val_loss:.3f}")
            if val_loss < best[0]:
                best = (val_loss, step, {k: v.clone() for k, v in model.state_dict().items()})

    # As the paper does (App. E), keep the weights that did best on held-out data: a corpus
    # this small is memorised within a few hundred steps.
    model.load_state_dict(best[2])
    print(f"      keeping step {best[1]} (held-out loss {best[0]:.3f})")
    model.save_pretrained(args.out / "model", tokenizer=tok.path)
    model = Transformer.from_pretrained(args.out / "model").eval()
    prompt = "病人：医生您好，我这两天发烧，嗓子疼。\n医生："
    out = generate(model, [tok.encode(prompt, bos=True)], max_new_tokens=80, eos_id=tok.eos_id,
                   temperature=0.7, top_p=0.9, repetition_penalty=1.1, vocab_limit=len(tok),
                   generator=torch.Generator().manual_seed(args.seed))
    print(f"[3/3] saved {args.out / 'model'} (HF layout), reloaded it, and sampled:\n")
    print(prompt + tok.decode(out.tokens[0]).split("\n病人：")[0])
    print(f"\ndone in {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
