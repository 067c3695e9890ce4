"""The embedded default, end to end on a laptop CPU: no downloads, no API key.

    python quickstart.py [--out runs/quickstart] [--steps 150]

1. trains a small sentencepiece tokenizer on the text shipped in data/;
2. fine-tunes the `tiny` LLaMA (model.CONFIGS) from random weights on the shipped SFT
   conversations, rendered by the HuatuoGPT chat template with the loss on the doctor's
   replies only, printing the held-out loss and keeping the best step;
3. saves it in the Hugging Face layout, loads it back, and answers a question with the KV cache.

Later stages of the pipeline (train_sft.py with FSDP, the reward model, PPO) replace step 2.
"""

import argparse
import math
import random
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from data.mixing import LengthGroupedBatches
from data.readers import read_schema
from data.template import IGNORE_INDEX, collate, render
from generate import generate
from model import CONFIGS, Transformer
from tokenizer import Tokenizer, corpus_sentences, train_tokenizer

ROOT = Path(__file__).resolve().parent


def sft_loss(model, batch) -> tuple[torch.Tensor, int]:
    """Mean next-token loss over the labelled (assistant) tokens of a right-padded batch.

    Right padding needs no attention mask: with causal attention a real token never looks at
    the padding after it, and padding positions carry no label.
    """
    logits = model(batch["tokens"][:, :-1])
    targets = batch["labels"][:, 1:]
    n = int((targets != IGNORE_INDEX).sum())
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX), n


@torch.no_grad()
def held_out_loss(model, items, pad_id, batch_size=8) -> float:
    total, count = 0.0, 0
    for i in range(0, len(items), batch_size):
        loss, n = sft_loss(model, collate(items[i:i + batch_size], pad_id))
        total, count = total + loss.item() * n, count + n
    return total / count


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "quickstart")
    p.add_argument("--data", nargs="+", default=sorted(str(f) for f in (ROOT / "data" / "sft").glob("*.jsonl")))
    p.add_argument("--vocab-size", type=int, default=2048, help="an upper bound; mostly single characters")
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    torch.manual_seed(args.seed)
    t0 = time.time()

    text_files = sorted(str(f) for f in (ROOT / "data").glob("*/*.jsonl"))
    tok = train_tokenizer(corpus_sentences(text_files), args.out / "tokenizer.model", vocab_size=args.vocab_size)
    print(f"[1/3] tokenizer: {len(tok)} pieces trained on {len(text_files)} files")

    config = CONFIGS["tiny"]
    tok.check_model_vocab(config.vocab_size)
    records = [r for f in args.data for r in read_schema(f)]
    random.Random(args.seed).shuffle(records)
    items = [render(tok, r["messages"], max_len=config.max_position_embeddings) for r in records]
    items = [x for x in items if x is not None]
    n_val = max(1, len(items) // 10)
    val, train = items[:n_val], items[n_val:]
    model = Transformer.from_config(config, seed=args.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.1, betas=(0.9, 0.95))
    batches = iter(LengthGroupedBatches([len(x.ids) for x in train], args.batch_size, seed=args.seed))
    print(f"[2/3] fine-tuning the tiny model ({config.num_params() / 1e6:.1f}M parameters) on {len(train)} "
          f"conversations, {len(val)} held out; a uniform guess scores {math.log(len(tok)):.2f}")
    model.eval()
    best = (held_out_loss(model, val, tok.pad_id), 0, None)
    print(f"      step    0  held-out loss {best[0]:.3f}")
    for step in range(1, args.steps + 1):
        model.train()
        lr = args.lr * min(1.0, step / 10) * 0.5 * (1 + math.cos(math.pi * step / args.steps))
        for group in opt.param_groups:
            group["lr"] = lr
        loss, _ = sft_loss(model, collate([train[i] for i in next(batches)], tok.pad_id))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step % 15 == 0 or step == args.steps:
            model.eval()
            val_loss = held_out_loss(model, val, tok.pad_id)
            print(f"      step {step:4d}  train loss {loss.item():.3f}  held-out loss {val_loss:.3f}")
            if val_loss < best[0]:
                best = (val_loss, step, {k: v.clone() for k, v in model.state_dict().items()})

    # As the paper does (App. E), keep the weights that did best on held-out data.
    model.load_state_dict(best[2])
    print(f"      keeping step {best[1]} (held-out loss {best[0]:.3f})")
    model.save_pretrained(args.out / "model", tokenizer=tok.path)
    model = Transformer.from_pretrained(args.out / "model").eval()
    question = "医生您好，我这两天发烧，嗓子疼。"
    prompt = render(tok, [{"role": "user", "content": question}])
    out = generate(model, [prompt.ids], max_new_tokens=100, eos_id=tok.eos_id, temperature=0.7, top_p=0.9,
                   repetition_penalty=1.1, vocab_limit=len(tok), generator=torch.Generator().manual_seed(args.seed))
    print(f"[3/3] saved {args.out / 'model'} (HF layout), reloaded it, and asked:\n")
    print(f"<病人>：{question}\n<HuatuoGPT>：{tok.decode(out.tokens[0])}")
    print(f"\ndone in {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
