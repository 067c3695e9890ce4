"""What PPO's design saves and costs on the CPU, on the ~46M-parameter `bench-50m` config:

1. π0's log-probs with the shared frozen trunk (a frozen copy of the top two blocks, norm and
   head run on the policy's bottom output, ppo_setup.reference_top) ÷ with a whole frozen copy
   of the SFT model: expected about 2/L of a forward plus the head's share.
2. Rollout tokens/s (train_ppo.rollout: generation by the FSDP-wrapped policy + value head, one
   rank) ÷ a plain generate call on an unwrapped model, same prompts and lengths; with the
   policy kept gathered through the rollout (the default) and with --reshard-in-rollout.
3. An update step with the frozen trunk kept from the experience pass ÷ one that runs the
   bottom again (train_ppo.update_step), at bench-50m (12 blocks, 10 frozen) and at a 40-block
   model of its width (Ziya's split: 38 frozen).
4. One whole round (the paper's: 64 experiences in chunks of 8, 4 PPO epochs; here with
   --round-size experiences), kept ÷ recomputed, and where its time goes: generation,
   reward-model scoring, the experience pass (the kept bottom output, the forwards of policy, value head
   and π0), the updates, as shares of the round.

5. Reward scoring (train_ppo.score_round over a rank's chunk) with the reward model sharded
   over the ranks (--reward-placement sharded, the default: each block all-gathered while it
   scores) ÷ replicated on every rank, alternated. On one process it is FSDP's own overhead; under
   torchrun the all-gathers too (gloo on a CPU; NCCL's over NVLink are another matter).

6. --frozen-bf16 under bf16 mixed precision (the GPU's code path, forced on the CPU): the
   experience pass and an update step with the frozen bottom stored in bf16 ÷ in fp32,
   alternated. The numbers are the same to the bit (tests/fsdp_worker.check_frozen_bf16); what
   changes is FSDP's cast of each frozen weight to bf16 before its all-gather, skipped.

Timings are medians of --repeats runs after a warm-up, made in one process; ratios only.

    python bench/bench_ppo.py [--repeats 5]
    torchrun --nproc_per_node 2 bench/bench_ppo.py --reward-only   # 5. alone, on 2 ranks
    python bench/bench_ppo.py --frozen-only                        # 6. alone
"""

import argparse
import math
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import distributed  # noqa: E402
import simulate  # noqa: E402
import train_ppo  # noqa: E402
from generate import generate  # noqa: E402
from model import CONFIGS, Transformer  # noqa: E402
from distributed import init_distributed  # noqa: E402


def median_time(fn, repeats):
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def rollout_queue(args):
    """7. The round's 64 prompts (the paper's rollout), 8 rows at a time, responses of up to 256
    tokens whose lengths spread as real ones do: the tiny model's head raised for one token,
    taken as eos, so that each step ends a response with probability 1/100 (a geometric spread,
    mean ~100, some cut at 256). Before: chunks of 8 (generate: each chunk steps until its
    longest ends). After: the queue of generate.decode_steps (a row that ended takes the next prompt). The
    same prompts; each timed --repeats times, alternated; medians, and each one's idle rows."""
    model = Transformer.from_config(CONFIGS["tiny"], seed=0).eval()
    eos, rows, new, n = 7, 8, 256, 64
    with torch.no_grad():  # logits near 0 over 4,096 tokens: +log(4096/99) makes eos 1/100
        model.lm_head.weight[eos] = 0
        bias = torch.zeros(model.config.vocab_size)
        bias[eos] = math.log((model.config.vocab_size - 1) / 99)
    head = model.lm_head
    model.lm_head = torch.nn.Linear(head.in_features, head.out_features, bias=True)
    with torch.no_grad():
        model.lm_head.weight.copy_(head.weight)
        model.lm_head.bias.copy_(bias)
    gen = torch.Generator().manual_seed(1)
    prompts = [
        [1] + torch.randint(10, 4000, (int(torch.randint(20, 120, (1,), generator=gen)),), generator=gen).tolist()
        for _ in range(n)
    ]
    shares = {}

    def chunked():
        g, used, steps = torch.Generator().manual_seed(0), 0, 0
        for c in range(0, n, rows):
            out = generate(model, prompts[c : c + rows], max_new_tokens=new, eos_id=eos, temperature=1.0, generator=g)
            used, steps = used + sum(map(len, out.tokens)), steps + rows * max(map(len, out.tokens))
        shares["chunks"] = 1 - used / steps

    def queued():
        gens = [torch.Generator().manual_seed(i) for i in range(n)]
        out = generate(model, prompts, rows=rows, generator=gens, max_new_tokens=new, eos_id=eos, temperature=1.0)
        shares["queue"] = out.idle_rows
        shares["lengths"] = sorted(map(len, out.tokens))

    times = {"chunks": [], "queue": []}
    torch.set_num_threads(2)
    for _ in range(args.repeats):
        for name, fn in (("chunks", chunked), ("queue", queued)):
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    before, after = statistics.median(times["chunks"]), statistics.median(times["queue"])
    lengths = shares["lengths"]
    print(
        f"7. rollout of {n} prompts, {rows} rows, up to {new} new tokens (tiny model; response lengths p10 "
        f"{lengths[n // 10]}, median {lengths[n // 2]}, p90 {lengths[9 * n // 10]}): chunks of {rows} {before:.2f} s "
        f"(idle rows {shares['chunks']:.0%}), queue {after:.2f} s (idle rows {shares['queue']:.0%}): "
        f"queue / chunks {after / before:.2f}"
    )


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--round-size", type=int, default=16, help="experiences in the timed round (the paper: 64)")
    p.add_argument("--reward-only", action="store_true", help="only 5., the reward model's placement")
    p.add_argument("--frozen-only", action="store_true", help="only 6., --frozen-bf16")
    p.add_argument("--queue-only", action="store_true", help="only 7., the rollout through a queue of rows")
    args = p.parse_args()
    if args.queue_only:
        return rollout_queue(args)
    d = init_distributed()
    config = CONFIGS["bench-50m"]
    if not args.frozen_only:
        reward_placement(config, d, args)
    if not args.reward_only:
        frozen_bf16(config, d, args)
    if args.reward_only or args.frozen_only:
        return d.close()
    sft = Transformer.from_config(config, seed=0).eval()
    model, ref = train_ppo.build(config, sft.state_dict(), d)
    tokens = torch.randint(3, config.vocab_size, (args.batch, args.seq_len), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        hidden = model.bottom(tokens)
        shared = median_time(lambda: ref(hidden=hidden), args.repeats)
        whole = median_time(lambda: sft(tokens), args.repeats)
    L = config.num_hidden_layers
    block = sum(p.numel() for p in sft.layers[0].parameters())
    head = sft.lm_head.weight.numel()
    expected = (2 * block + head) / (L * block + head)  # the weights each forward multiplies by
    print(f"bench-50m ({L} blocks), batch {args.batch} x {args.seq_len} tokens")
    print(
        f"pi0 log-probs, shared trunk / whole frozen copy: {shared / whole:.3f}  (2 of {L} blocks and the head, "
        f"by their weights: {expected:.3f}; the target, that +10%: {1.1 * expected:.3f})"
    )

    prompts = [
        [1] + torch.randint(3, 2000, (24,), generator=torch.Generator().manual_seed(i)).tolist()
        for i in range(args.batch)
    ]

    class Tok:
        eos_id, pad_id = -1, 0  # no eos: every sequence runs to the full length

        def __len__(self):
            return config.vocab_size

    class NoReward:
        def score_ids(self, prompts, responses, **kw):
            return torch.zeros(len(prompts))

    class RoundTok(Tok):
        eos_id = 2  # the reward model reads its score at an eos (rarely sampled by random weights)

    def rollout(reshard):
        run_args = SimpleNamespace(
            seed=0,
            chunk_size=args.batch,
            score_batch_size=args.batch,
            bottom_batch_size=args.batch,
            max_new_tokens=args.new_tokens,
            unfinished_penalty=0.0,
            reshard_in_rollout=reshard,
        )
        return lambda: train_ppo.rollout(
            model, NoReward(), prompts, Tok(), train_ppo.RolloutSettings.of(run_args), d, 0
        )

    def plain():
        return generate(
            sft,
            prompts,
            max_new_tokens=args.new_tokens,
            eos_id=-1,
            pad_id=0,
            temperature=1.0,
            generator=torch.Generator().manual_seed(0),
        )

    times = {"gathered": [], "resharded": [], "plain": []}
    for fn in (rollout(False), rollout(True), plain):
        fn()  # warm-up
    for _ in range(args.repeats):  # alternate, so that a noisy neighbour hurts all alike
        for name, fn in zip(times, (rollout(False), rollout(True), plain)):
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    plain_s = statistics.median(times["plain"])
    print(
        f"rollout tokens/s / plain generate tokens/s ({args.batch} x {args.new_tokens} new tokens): "
        f"policy kept gathered (the default) {plain_s / statistics.median(times['gathered']):.3f}, "
        f"--reshard-in-rollout {plain_s / statistics.median(times['resharded']):.3f}"
    )

    from model import ModelConfig
    from model import RewardModel

    def round_args(experiences):
        return SimpleNamespace(
            seed=0,
            chunk_size=train_ppo.CHUNK_SIZE,
            score_batch_size=train_ppo.SCORE_BATCH_SIZE,
            bottom_batch_size=train_ppo.BOTTOM_BATCH_SIZE,
            max_new_tokens=args.new_tokens,
            unfinished_penalty=0.0,
            batch_size=experiences // 4,
            micro_batch_size=experiences // 4,
            ppo_epochs=train_ppo.PPO_EPOCHS,
            clip_ratio=train_ppo.CLIP_RATIO,
            clip_value=train_ppo.CLIP_VALUE,
            vf_coef=train_ppo.VF_COEF,
            grad_clip=train_ppo.GRAD_CLIP,
            grad_sync="every",
            reshard_in_rollout=False,
        )

    # 3. One update step, the trunk kept or recomputed: the same experiences, steps alternated.
    prompt_len = args.seq_len - args.new_tokens
    for blocks in (L, 40):
        cfg = ModelConfig(**{**config.__dict__, "num_hidden_layers": blocks})
        policy, pi0 = train_ppo.build(cfg, Transformer.from_config(cfg, seed=0).state_dict(), d)
        step_args = round_args(16)
        exps = [
            train_ppo.Experience([1] + [5 + i] * (prompt_len - 1), [7 + i] * args.new_tokens, True, score=0.1 * i)
            for i in range(16)
        ]
        batches = train_ppo.minibatches(len(exps), step_args.batch_size, 0, 0)
        train_ppo.make_experience(
            policy,
            pi0,
            exps,
            batches,
            RoundTok(),
            d,
            0.1,
            micro_batch_size=step_args.micro_batch_size,
            bottom_batch_size=step_args.bottom_batch_size,
        )
        recomputing = [train_ppo.Experience(**{**e.__dict__, "bottom_out": None}) for e in exps]
        step_opt = train_ppo.make_optimizer(policy, 0.0, 0.0)  # lr 0: every step does the same work on the same weights
        times = {"kept": [], "recomputed": []}
        for _ in range(args.repeats + 1):
            for name, batch_exps in (("kept", exps), ("recomputed", recomputing)):
                t = time.perf_counter()
                train_ppo.update_step(
                    policy, step_opt, batch_exps, batches[0], RoundTok(), train_ppo.UpdateSettings.of(step_args), d, {}
                )
                times[name].append(time.perf_counter() - t)
        kept, recomputed = (statistics.median(v[1:]) for v in times.values())
        print(
            f"update step ({blocks} blocks, {cfg.num_hidden_layers - 2} frozen; {step_args.batch_size} x "
            f"{args.seq_len} tokens): trunk kept {kept:.3f} s, recomputed {recomputed:.3f} s: "
            f"{recomputed / kept:.2f}x faster kept"
        )
        del policy, pi0, step_opt

    # 4. A whole round, before (the trunk recomputed in every update) and after, alternated.
    rm = RewardModel(config).eval()
    opt = train_ppo.make_optimizer(model, 1e-6, 0.0)
    run = round_args(args.round_size)
    round_prompts = [prompts[i % len(prompts)] for i in range(args.round_size)]
    parts = {True: {}, False: {}}
    for r in range(args.repeats + 1):
        for recompute in (True, False):
            exps, seconds = train_ppo.rollout(
                model, rm, round_prompts, RoundTok(), train_ppo.RolloutSettings.of(run), d, r
            )
            batches = train_ppo.minibatches(len(exps), run.batch_size, run.seed, r)
            t = time.perf_counter()
            train_ppo.make_experience(
                model,
                ref,
                exps,
                batches,
                RoundTok(),
                d,
                0.1,
                micro_batch_size=run.micro_batch_size,
                bottom_batch_size=run.bottom_batch_size,
                recompute_bottom=recompute,
            )
            experience = time.perf_counter() - t
            train_ppo.update(
                model,
                opt,
                train_ppo.AdaptiveKL(0.1, None, 1),
                exps,
                batches,
                RoundTok(),
                train_ppo.UpdateSettings.of(run),
                d,
                0.0,
                10**9,
            )
            if r:  # the first pair warms up
                for name, v in (
                    ("generation", seconds["generate_s"]),
                    ("reward scoring", seconds["score_s"]),
                    ("experience pass", experience),
                    ("updates", time.perf_counter() - t - experience),
                ):
                    parts[recompute].setdefault(name, []).append(v)
    for recompute in (True, False):
        parts[recompute] = {k: statistics.median(v) for k, v in parts[recompute].items()}
    before, after = (sum(parts[k].values()) for k in (True, False))
    print(
        f"one round of {args.round_size} experiences ({args.new_tokens} new tokens each, chunks of {run.chunk_size}, "
        f"{run.ppo_epochs} epochs of minibatches of {run.batch_size}): {before:.2f} s recomputing the trunk, "
        f"{after:.2f} s keeping it: {before / after:.2f}x faster"
    )
    for recompute in (True, False):
        total = sum(parts[recompute].values())
        print(
            f"  {'recomputed' if recompute else 'kept'}: "
            + ", ".join(f"{k} {v / total:.0%}" for k, v in parts[recompute].items())
        )
    d.close()


def reward_placement(config, d, args):
    """5. Scoring a rank's chunk, the reward model sharded ÷ replicated, steps alternated."""
    from model import RewardModel

    torch.manual_seed(0)
    full = RewardModel(config)
    full.trunk.init_weights(seed=0)
    with torch.no_grad():
        full.score_head.weight.normal_(0, 0.02)
    state = full.scorer().state_dict()
    # load_sharded takes its dict over (its tensors become the shards): it gets a copy
    sharded = distributed.load_sharded(train_ppo.reward_empty(config, d, torch.float32), dict(state), d)
    replicated = train_ppo.reward_empty(config, d, torch.float32, sharded=False)
    replicated.load_state_dict(state)
    gen = torch.Generator().manual_seed(d.rank)
    prompt_len = args.seq_len - args.new_tokens
    exps = [
        train_ppo.Experience(
            [1] + torch.randint(3, 2000, (prompt_len - 1,), generator=gen).tolist(),
            torch.randint(3, 2000, (args.new_tokens,), generator=gen).tolist(),
            True,
        )
        for _ in range(args.batch)
    ]
    tok = simulate.StandInTokenizer(config.vocab_size)
    run = SimpleNamespace(score_batch_size=args.batch, unfinished_penalty=0.0)
    times = {"sharded": [], "replicated": []}
    for r in range(args.repeats + 1):
        for name, rm in (("sharded", sharded), ("replicated", replicated)):
            t = time.perf_counter()
            train_ppo.score_round(rm, exps, tok, batch_size=run.score_batch_size)
            if r:  # the first pair warms up
                times[name].append(time.perf_counter() - t)
    shard_s, whole_s = (statistics.median(v) for v in times.values())
    if d.main:
        print(
            f"reward scoring ({args.batch} x {args.seq_len} tokens a rank, {d.world} rank(s)): sharded / replicated "
            f"{shard_s / whole_s:.2f} ({shard_s:.3f} s, {whole_s:.3f} s)"
        )


def frozen_bf16(config, d, args):
    """6. The experience pass and an update step under bf16, the frozen bottom stored in bf16 ÷
    fp32, alternated."""
    state = Transformer.from_config(config, seed=0).state_dict()
    run = SimpleNamespace(
        batch_size=8,
        micro_batch_size=4,
        seed=0,
        ppo_epochs=1,
        clip_ratio=train_ppo.CLIP_RATIO,
        clip_value=train_ppo.CLIP_VALUE,
        vf_coef=train_ppo.VF_COEF,
        grad_clip=train_ppo.GRAD_CLIP,
        grad_sync="every",
        chunk_size=8,
        score_batch_size=8,
        bottom_batch_size=8,
    )
    tok = simulate.StandInTokenizer(config.vocab_size)
    prompt_len = args.seq_len - args.new_tokens
    setups = {}
    for stored in (True, False):
        model, ref = train_ppo.build(config, dict(state) if d.main else None, d, bf16=True, frozen_bf16=stored)
        exps = [
            train_ppo.Experience([1] + [5 + i] * (prompt_len - 1), [7 + i] * args.new_tokens, True, score=0.1 * i)
            for i in range(run.batch_size)
        ]
        setups[stored] = model, ref, exps, train_ppo.make_optimizer(model, 0.0, 0.0)
    batches = train_ppo.minibatches(run.batch_size, run.batch_size, 0, 0)
    times = {True: [], False: []}
    for r in range(args.repeats + 1):
        for stored, (model, ref, exps, opt) in setups.items():
            for e in exps:
                e.bottom_out = None
            t = time.perf_counter()
            train_ppo.make_experience(
                model,
                ref,
                exps,
                batches,
                tok,
                d,
                0.1,
                micro_batch_size=run.micro_batch_size,
                bottom_batch_size=run.bottom_batch_size,
            )
            train_ppo.update_step(model, opt, exps, batches[0], tok, train_ppo.UpdateSettings.of(run), d, {})
            if r:  # the first pair warms up
                times[stored].append(time.perf_counter() - t)
    bf16_s, fp32_s = (statistics.median(times[k]) for k in (True, False))
    if d.main:
        print(
            f"experience pass + update step under bf16 ({run.batch_size} x {args.seq_len} tokens, {d.world} "
            f"rank(s)): --frozen-bf16 / the bottom in fp32 {bf16_s / fp32_s:.2f} ({bf16_s:.3f} s, {fp32_s:.3f} s)"
        )


if __name__ == "__main__":
    main()
