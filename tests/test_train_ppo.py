"""train_ppo.py: GAE, whitening and the clipped losses by hand; the shared-trunk reference
against a whole frozen copy of the SFT model; π = π0 at the first round; the frozen part
stays bitwise; the ratio is exactly 1 before the first update; a scripted reward is learnt
(and a large λ_KL holds the policy near π0); the command line end to end, resumed."""

import json
import math
import re
import signal
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from conftest import ROOT, poison_update, sharpen_, trainer_env, two_nodes

import plan
import ppo_setup
import train_ppo
from model import ModelConfig, Transformer, token_logprobs
from pretrained import load_reward_model, save_model
from train_ppo import (
    AdaptiveKL,
    Experience,
    RolloutSettings,
    UpdateSettings,
    gae,
    per_token_rewards,
    ppo_loss_sum,
    whiten,
)
from distributed import init_distributed

CONFIG = ModelConfig(
    vocab_size=24,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    rope_theta=500.0,
)


class Tok:
    eos_id, pad_id = 2, 0

    def __len__(self):
        return CONFIG.vocab_size


def args_for(**kw):
    base = dict(
        seed=0,
        chunk_size=4,
        max_new_tokens=6,
        batch_size=4,
        micro_batch_size=2,
        ppo_epochs=2,
        unfinished_penalty=0.0,
        clip_ratio=0.2,
        clip_value=0.2,
        vf_coef=1.0,
        grad_clip=1.0,
        grad_sync="every",
        reshard_in_rollout=False,
    )
    merged = {**base, **kw}
    for batch in ("score_batch_size", "bottom_batch_size"):  # as --chunk-size set them before they had names
        merged.setdefault(batch, merged["chunk_size"])
    return SimpleNamespace(**merged)


@pytest.fixture
def ppo(monkeypatch):
    """A one-rank process group, an SFT model (fp64, sharp weights) and PPO's two modules."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    d = init_distributed()
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        torch.manual_seed(0)
        sft = sharpen_(Transformer(CONFIG)).eval()
        state = {k: v.clone() for k, v in sft.state_dict().items()}
        model, ref = train_ppo.build(CONFIG, state, d)
        yield SimpleNamespace(d=d, sft=sft, state=state, model=model, ref=ref)
    finally:
        torch.set_default_dtype(default)
        d.close()


def prompts(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [
        [1] + torch.randint(3, CONFIG.vocab_size, (int(torch.randint(2, 7, (1,), generator=g)),), generator=g).tolist()
        for _ in range(n)
    ]


class TokenReward:
    """A scripted reward model: the share of the response's tokens that are `token`."""

    def __init__(self, token):
        self.token = token

    def score_ids(self, prompts, responses, *, eos_id, pad_id):
        return torch.tensor([sum(t == self.token for t in r) / max(1, len(r)) for r in responses])


# -- the algorithm by hand ---------------------------------------------------------------------------------


@pytest.mark.numerics
def test_gae_and_returns_by_hand():
    adv, ret = gae(
        torch.tensor([1.0, 0.0, 2.0], dtype=torch.float64), torch.tensor([0.5, 1.0, 0.0], dtype=torch.float64)
    )
    # t=2: δ = 2 + 0 − 0 = 2; t=1: δ = 0 + 0 − 1 = −1, A = −1 + .95·2 = .9; t=0: δ = 1 + 1 − .5 = 1.5, A = 1.5 + .95·.9
    assert adv.tolist() == pytest.approx([2.355, 0.9, 2.0], abs=1e-12)
    assert ret.tolist() == pytest.approx([2.855, 1.9, 2.0], abs=1e-12)
    adv, _ = gae(
        torch.tensor([0.0, 1.0], dtype=torch.float64), torch.tensor([0.0, 0.0], dtype=torch.float64), gamma=0.5, lam=1.0
    )
    assert adv.tolist() == [0.5, 1.0]  # the reward discounted once (exact in binary)
    w = whiten(torch.tensor([1.0, 2.0, 3.0, 6.0], dtype=torch.float64))
    assert float(w.mean()) == pytest.approx(0, abs=1e-12) and float(w.var()) == pytest.approx(1, abs=1e-7)


@pytest.mark.numerics
def test_rewards_are_the_kl_penalty_plus_the_score_at_the_end():
    def f64(*x):
        return torch.tensor(x, dtype=torch.float64)

    r = per_token_rewards(f64(-1.0, -2.0, -0.5), f64(-1.5, -2.0, -1.0), score=3.0, kl_coef=0.1)
    assert r.tolist() == pytest.approx([-0.05, 0.0, -0.05 + 3.0], rel=1e-12, abs=1e-15)


@pytest.mark.numerics
def test_clipped_surrogate_and_value_loss_by_hand():
    old = torch.zeros(1, 3, dtype=torch.float64)
    logp = torch.tensor([[math.log(1.5), math.log(1.1), math.log(0.5)]], dtype=torch.float64, requires_grad=True)
    adv = torch.tensor([[1.0, 1.0, -2.0]], dtype=torch.float64)
    values = torch.tensor([[0.5, 0.0, 0.0]], dtype=torch.float64, requires_grad=True)
    returns = torch.tensor([[1.0, 0.0, 0.0]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1]])
    loss, stats = ppo_loss_sum(logp, old, values, torch.zeros_like(values), adv, returns, mask)
    loss.backward()
    # Token 0: A > 0 and ρ = 1.5 > 1 + ε: clipped, no gradient. Token 1: ρ = 1.1 inside: −A·ρ,
    # gradient −A·ρ = −1.1. Token 2: A < 0 and ρ = 0.5 < 1 − ε: max(1.0, 1.6) = clipped 1.6, no gradient.
    assert logp.grad[0].tolist() == pytest.approx([0.0, -1.1, 0.0])
    assert stats["policy_loss"] == pytest.approx(-1.2 - 1.1 + 1.6)
    assert stats["clip_fraction"] == 2
    # Value: V = 0.5 moved beyond old ± 0.2 -> max(½(0.5 − 1)², ½(0.2 − 1)²) = 0.32, and its
    # gradient is 0 (the clipped term wins).
    assert stats["value_loss"] == pytest.approx(0.32) and values.grad[0, 0] == 0


def test_rollout_memory_by_hand():
    # The policy kept gathered through the rollout holds every weight and the value head in
    # bf16 (2 bytes each) on every rank; --reshard-in-rollout only the root and two blocks.
    cfg = ModelConfig(
        vocab_size=100,
        hidden_size=8,
        intermediate_size=16,
        num_hidden_layers=4,
        num_attention_heads=2,
        num_key_value_heads=2,
    )
    n = cfg.num_params()  # 2 * 100 * 8 (embedding, head) + 4 * (4 * 64 + 3 * 128 + 16) + 8 = 4232
    assert n == 4232
    kw = dict(world=2, chunk=1, prompt_len=1, new_tokens=1, micro_batch=1, trainable_blocks=2)
    gathered = plan.ppo_memory(cfg, **kw)["in_flight"] * 2**30
    resharded = plan.ppo_memory(cfg, **kw, gathered_rollout=False)["in_flight"] * 2**30
    assert gathered == pytest.approx(2 * (4232 + 8)) and resharded == pytest.approx(2 * (1600 + 2 * 656))


def test_adaptive_kl_controller():
    kl = AdaptiveKL(0.1, target=6.0, horizon=10_000)
    kl.update(12.0, n_steps=100)  # twice the target: the error is clipped to +0.2
    assert kl.value == pytest.approx(0.1 * (1 + 0.2 * 100 / 10_000))
    kl.update(6.0, n_steps=100)
    assert kl.value == pytest.approx(0.1 * 1.002)
    fixed = AdaptiveKL(0.1, target=None, horizon=10_000)
    fixed.update(100.0, n_steps=100)
    assert fixed.value == 0.1


# -- the model and the round, on a one-rank process group -------------------------------------------------


def experiences(ppo, n=8, seed=0, kl_coef=0.1, args=None):
    """A round's experiences, made: (experiences, args, the round's minibatches)."""
    args = args or args_for()
    exps, _ = train_ppo.rollout(
        ppo.model, TokenReward(5), prompts(n, seed), Tok(), RolloutSettings.of(args), ppo.d, round_no=seed
    )
    batches = train_ppo.minibatches(len(exps), args.batch_size, args.seed, seed)
    train_ppo.make_experience(
        ppo.model,
        ppo.ref,
        exps,
        batches,
        Tok(),
        ppo.d,
        kl_coef,
        micro_batch_size=args.micro_batch_size,
        bottom_batch_size=args.bottom_batch_size,
    )
    return exps, args, batches


def update(model, opt, exps, batches, args, d):
    """A round's updates at a fixed λ_KL."""
    return train_ppo.update(
        model, opt, AdaptiveKL(0.1, None, 1), exps, batches, Tok(), UpdateSettings.of(args), d, 0.0, 10**9
    )


@pytest.mark.numerics
def test_shared_trunk_reference_equals_a_whole_frozen_sft_model(ppo):
    exps = [Experience(p, r, True) for p, r in zip(prompts(5), [[7, 8, 9], [4], [10, 11, 12, 13, 2], [6, 6], [3, 2]])]
    out = train_ppo.response_outputs(ppo.model, exps, Tok.pad_id, ppo.d.device, ref=ppo.ref)
    tokens, mask, P, R = train_ppo.batch_tensors(exps, Tok.pad_id, "cpu")
    with torch.no_grad():
        whole = token_logprobs(ppo.sft(tokens, mask)[:, P - 1 : P + R - 1], tokens[:, P : P + R])
    m = out["mask"].bool()
    assert torch.allclose(out["ref_logp"][m], whole[m], rtol=0, atol=1e-10)  # fp64: rounding-free
    assert torch.allclose(out["logp"][m], whole[m], rtol=0, atol=1e-10)  # π = π0 before any update


@pytest.mark.numerics
def test_first_round_pi_equals_pi0_and_the_first_ratio_is_exactly_one(ppo):
    exps, args, batches = experiences(ppo)
    for e in exps:
        assert torch.equal(e.logp, e.ref_logp)  # KL exactly 0
        r = per_token_rewards(e.logp, e.ref_logp, e.score, 0.1)
        assert r[:-1].abs().max().item() == 0 if len(r) > 1 else True
        assert r[-1].item() == e.score
    # The first epoch's first micro-batch, run as training runs it (with gradients), gives the
    # very log-probs stored as old: the ratio is 1 exactly, not approximately.
    first = batches[0][: args.micro_batch_size]
    out = train_ppo.response_outputs(ppo.model, [exps[i] for i in first], Tok.pad_id, ppo.d.device)
    assert out["logp"].requires_grad
    for row, i in enumerate(first):
        assert torch.equal(out["logp"][row, : len(exps[i].response)].detach(), exps[i].logp)


class ShortTok(Tok):
    """A tokenizer of 20 pieces for CONFIG's embedding of 24 rows (Ziya's has 14 rows past its tokenizer)."""

    def __len__(self):
        return 20


@pytest.mark.numerics
def test_the_stored_old_log_probs_are_those_of_the_distribution_the_rollout_sampled(ppo, monkeypatch):
    """Issue 44 item 4: the rollout samples from π restricted to the tokenizer's ids (vocab_limit),
    while the old log-probs, the ratio and the KL used π over the whole embedding (0.111 of π's
    mass a step on ids it cannot draw with the tests' micro model; old log-probs off by up to
    0.119 nats). Every stored log-prob now equals log p(token) under the distribution each
    token was drawn from (recorded at generate.draw, fp64), and log π0 is over the same ids."""
    import generate

    drawn = {}  # id(generator) -> [log-probability of each token drawn with it]
    real = generate.draw

    def draw(scores, temperature, generator=None):
        tokens = real(scores, temperature, generator)
        logp = scores.log_softmax(-1).gather(-1, tokens[:, None])[:, 0]
        for g, lp in zip(generator, logp.tolist()):
            drawn.setdefault(id(g), []).append(lp)
        return tokens

    made = []
    real_generator = torch.Generator

    def generator(*a, **kw):  # each prompt's generator, in the order of the prompts
        g = real_generator(*a, **kw)
        made.append(g)
        return g

    monkeypatch.setattr(generate, "draw", draw)
    monkeypatch.setattr(torch, "Generator", generator)
    args = args_for()
    exps, _ = train_ppo.rollout(
        ppo.model, TokenReward(5), prompts(8), ShortTok(), RolloutSettings.of(args), ppo.d, round_no=0
    )
    monkeypatch.setattr(torch, "Generator", real_generator)
    assert all(t < 20 for e in exps for t in e.response)
    batches = train_ppo.minibatches(len(exps), args.batch_size, args.seed, 0)
    train_ppo.make_experience(
        ppo.model,
        ppo.ref,
        exps,
        batches,
        ShortTok(),
        ppo.d,
        0.1,
        micro_batch_size=args.micro_batch_size,
        bottom_batch_size=args.bottom_batch_size,
    )
    gens = [g for g in made if id(g) in drawn]
    assert len(gens) == len(exps)
    # The sampler rounds the logits to fp32 (generate.process_logits): a token's log-prob there
    # is off the fp64 one by a few fp32 ulps of the logits (|logit| < 64 here: 4e-6 each for the
    # token's logit and the log-sum-exp), against 0.1-0.4 nats when the supports differ.
    for e, g in zip(exps, gens):
        assert e.logp.dtype == torch.float64
        assert torch.allclose(e.logp, torch.tensor(drawn[id(g)], dtype=torch.float64), rtol=0, atol=1e-5)
        assert torch.equal(e.logp, e.ref_logp)  # π = π0 at the first round, over the same ids
    with torch.no_grad():  # and the whole embedding's π does put mass on the 4 ids past the tokenizer
        logits = ppo.sft(torch.tensor([exps[0].prompt]))[0, -1]
    assert logits.abs().max() < 64 and logits.softmax(-1)[20:].sum() > 1e-3


def test_the_unfinished_penalty_lowers_a_cut_responses_score_and_cannot_be_given_the_other_sign(capsys):
    """Issue 44 item 4: --unfinished-penalty was added to a cut response's score, where TRL's
    missing_eos_penalty is subtracted: the positive number a TRL user knows rewarded truncation.
    Now a positive penalty is subtracted, and a negative one is refused at parse time."""
    exps = [Experience([1, 3], [5, 5, 2], True), Experience([1, 4], [5, 6], False)]  # the second was cut
    train_ppo.score_round(TokenReward(5), exps, Tok(), batch_size=2, unfinished_penalty=0.25)
    assert exps[0].score == pytest.approx(2 / 3, abs=1e-7) and exps[1].score == 0.5 - 0.25
    with pytest.raises(SystemExit):
        train_ppo.main(["--unfinished-penalty", "-0.5", "--dry-run"])
    assert "--unfinished-penalty" in capsys.readouterr().err


@pytest.mark.numerics
def test_updates_touch_only_the_last_two_blocks_and_pi0_stays_the_sft_model(ppo):
    opt = train_ppo.make_optimizer(ppo.model, 1e-2, 0.0)
    before = {k: v.full_tensor().clone() for k, v in ppo.model.state_dict().items()}
    for round_no in range(2):
        exps, args, batches = experiences(ppo, seed=round_no)
        update(ppo.model, opt, exps, batches, args, ppo.d)
    after = {k: v.full_tensor() for k, v in ppo.model.state_dict().items()}
    frozen = [k for k in before if k.startswith(("policy.embed", "policy.layers.0.", "policy.layers.1."))]
    trained = [k for k in before if k not in frozen]
    assert len(frozen) == 1 + 2 * 9 and all(torch.equal(before[k], after[k]) for k in frozen)
    assert all(not torch.equal(before[k], after[k]) for k in trained)  # blocks 2, 3, norm, head, value head
    ref = {k: v for k, v in ppo.ref.state_dict().items()}
    assert all(
        torch.equal(ref[f"layers.{i - 2}.{rest}"], ppo.state[f"layers.{i}.{rest}"])
        for k in ppo.state
        if k.startswith(("layers.2.", "layers.3."))
        for i, rest in [(int(k.split(".")[1]), k.split(".", 2)[2])]
    )
    assert torch.equal(ref["lm_head.weight"], ppo.state["lm_head.weight"])


@pytest.mark.numerics
def test_the_kept_trunk_gives_the_updates_of_recomputing_it_and_block_0_never_runs_in_an_update(ppo):
    """Issue 23: every update ran the frozen bottom again (block 0 ran 32 times in a round of 8
    experiences); its output is kept from the experience pass instead (trunk batches of 8, not
    the updates' micro-batches of 2). Two rounds' updates equal those that recompute it, in fp64."""
    args = args_for(batch_size=4, micro_batch_size=2, ppo_epochs=2, chunk_size=8)
    results = []
    for recompute in (False, True):
        model, ref = train_ppo.build(CONFIG, ppo.state, ppo.d)
        opt = train_ppo.make_optimizer(model, 1e-2, 0.0)
        calls = []
        for round_no in range(2):
            exps, _ = train_ppo.rollout(
                model, TokenReward(5), prompts(8, round_no), Tok(), RolloutSettings.of(args), ppo.d, round_no
            )
            batches = train_ppo.minibatches(len(exps), args.batch_size, args.seed, round_no)
            train_ppo.make_experience(
                model,
                ref,
                exps,
                batches,
                Tok(),
                ppo.d,
                0.1,
                micro_batch_size=args.micro_batch_size,
                bottom_batch_size=args.bottom_batch_size,
                recompute_bottom=recompute,
            )
            hook = model.layers[0].register_forward_hook(lambda *_: calls.append(1))
            update(model, opt, exps, batches, args, ppo.d)
            hook.remove()
        results.append(({k: v.full_tensor() for k, v in model.state_dict().items()}, len(calls)))
    (kept, kept_calls), (recomputed, recomputed_calls) = results
    assert kept_calls == 0 and recomputed_calls == 2 * 2 * 2 * 2  # rounds x minibatches x epochs x micro-batches
    for k in kept:
        torch.testing.assert_close(kept[k], recomputed[k], rtol=0, atol=1e-12)
    assert not torch.equal(kept["policy.layers.3.mlp.up_proj.weight"], ppo.state["layers.3.mlp.up_proj.weight"])


@pytest.mark.numerics
def test_the_kl_controller_moves_as_trlx_moved_it_and_a_run_stops_at_max_steps(ppo):
    """Issue 23: λ_KL moved once a round (with n_steps = --batch-size), trlx (355c974) after every
    minibatch's --ppo-epochs steps, 4 times a round here: after a round at twice the target
    (clipped to +0.2), ours was 0.1 x 1.00032 where trlx's is 0.1 x 1.00032^4. And --max-steps 20
    at 16 steps a round ran 32."""

    def trlx_learn(value, kl, n_rollouts, batch_size, ppo_epochs, target, horizon, steps):
        """AccelerateRLTrainer.learn and AcceleratePPOTrainer.post_backward_callback at trlx
        355c974, for one round of the store, transcribed: (λ after it, optimizer steps made)."""
        iter_count = 0
        for _ in range(n_rollouts // batch_size):  # for mbs in MiniBatchIterator(train_dataloader, ...)
            for _ in range(ppo_epochs):  # for _ in range(self.n_updates_per_batch)
                iter_count += 1  # self.opt.step(); self.iter_count += 1
                if iter_count >= steps:
                    return value, iter_count  # if self.iter_count >= self.total_steps: return
            error = min(max(kl / target - 1, -0.2), 0.2)  # self.kl_ctl.update(self.mean_kl, n_steps=batch_size)
            value *= 1 + error * batch_size / horizon
        return value, iter_count

    args = args_for(batch_size=2, micro_batch_size=2, ppo_epochs=2, chunk_size=8)
    exps, _, batches = experiences(ppo, n=8, args=args)
    opt = train_ppo.make_optimizer(ppo.model, 0.0, 0.0)  # no step moves anything: only the schedule counts
    for mean_kl, steps in ((12.0, 10**9), (1.5, 10**9), (12.0, 5)):
        kl = AdaptiveKL(0.1, target=6.0, horizon=10_000)
        stats = train_ppo.update(
            ppo.model, opt, kl, exps, batches, Tok(), UpdateSettings.of(args), ppo.d, mean_kl, steps
        )
        assert (kl.value, stats["steps"]) == trlx_learn(0.1, mean_kl, 8, 2, 2, 6.0, 10_000, steps)
    assert trlx_learn(0.1, 12.0, 64, 16, 4, 6.0, 10_000, 10**9)[0] == pytest.approx(0.1 * 1.00032**4)


def test_prompts_leave_room_for_the_reward_models_eos():
    """Issue 23: prompts were read up to the policy's context less --max-new-tokens; a response
    cut there got an eos for the reward model, one token over its context (ValueError: 513
    tokens exceeds the reward model's context of 512), and --resume replayed the crash."""

    def cfg(context):
        return ModelConfig(
            vocab_size=400,
            hidden_size=32,
            intermediate_size=48,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=context,
        )

    assert train_ppo.prompt_budget(cfg(512), cfg(512), 8) == 512 - 8 - 1
    assert train_ppo.prompt_budget(cfg(512), cfg(300), 8) == 300 - 8 - 1  # the smaller context rules
    assert train_ppo.prompt_budget(cfg(256), cfg(512), 8) == 256 - 8  # the policy's own limit: no eos to add


def learn(ppo, kl_coef, rounds=16):
    """Rounds of PPO against TokenReward(5) at a fixed λ_KL, from a plainly initialised model
    (near-uniform next-token distributions, so the rewarded token is sampled at all):
    [(mean score, mean KL)] per round."""
    model, ref = train_ppo.build(CONFIG, Transformer(CONFIG).init_weights(0).state_dict(), ppo.d)
    run = SimpleNamespace(d=ppo.d, model=model, ref=ref)
    args = args_for(batch_size=8, micro_batch_size=4, ppo_epochs=4, max_new_tokens=8, chunk_size=8)
    opt = train_ppo.make_optimizer(model, 1e-2, 0.0)
    history = []
    for round_no in range(rounds):
        exps, _, batches = experiences(run, n=16, seed=round_no, kl_coef=kl_coef, args=args)
        update(model, opt, exps, batches, args, ppo.d)
        history.append(
            (sum(e.score for e in exps) / len(exps), sum(float((e.logp - e.ref_logp).sum()) for e in exps) / len(exps))
        )
    return history


def test_a_scripted_reward_is_learnt_and_a_large_kl_coefficient_holds_the_policy_near_pi0(ppo):
    def mean(xs):
        return sum(xs) / len(xs)

    free = learn(ppo, kl_coef=0.05)
    first, last = mean([s for s, _ in free[:4]]), mean([s for s, _ in free[-4:]])
    assert last > max(2 * first, 0.12), free  # the share of the rewarded token rises (0.06 -> 0.28 here)
    # while the KL stays bounded: at λ 0.05 it peaks at 10.5 nats a response here; a policy that
    # runs away from π0 reaches hundreds
    assert all(abs(kl) < 20 for _, kl in free), free
    held = learn(ppo, kl_coef=50.0)
    kl_free, kl_held = mean([kl for _, kl in free[-8:]]), mean([kl for _, kl in held[-8:]])
    assert kl_held < kl_free / 3, (free, held)  # 3.0 vs 0.2 nats here
    assert mean([s for s, _ in held[-4:]]) < last, held


# -- the command line -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, tokenizer_file):
    """A tiny SFT policy and a reward model on the test tokenizer, in the HF layout."""
    from model import RewardModel

    root = tmp_path_factory.mktemp("ppo_models")
    config = ModelConfig(
        vocab_size=400,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        rope_theta=500.0,
    )
    save_model(Transformer(config).init_weights(0), root / "sft", tokenizer=tokenizer_file)
    rm = RewardModel(config)
    rm.trunk.init_weights(1)
    torch.nn.init.normal_(rm.score_head.weight, std=1.0, generator=torch.Generator().manual_seed(2))
    save_model(rm, root / "rm", tokenizer=tokenizer_file)
    return root


def cli(checkpoints, out, *extra):
    return [
        sys.executable,
        str(ROOT / "train_ppo.py"),
        "--policy",
        str(checkpoints / "sft"),
        "--reward",
        str(checkpoints / "rm"),
        "--data",
        str(ROOT / "data" / "sft" / "doctor_qa.jsonl"),
        "--exclude",
        str(ROOT / "data" / "preference" / "preference_pairs.jsonl"),
        "--out",
        str(out),
        "--max-steps",
        "8",
        "--rollout-size",
        "8",
        "--chunk-size",
        "4",
        "--batch-size",
        "4",
        "--ppo-epochs",
        "1",
        "--max-new-tokens",
        "8",
        "--lr",
        "1e-3",
        "--save-every",
        "1",
        *extra,
    ]


ENV = trainer_env()


def test_command_line_writes_metrics_and_an_hf_policy_and_resumes_exactly_after_sigkill(checkpoints, tmp_path):
    import time

    from safetensors.torch import load_file
    from transformers import LlamaForCausalLM

    subprocess.run(cli(checkpoints, tmp_path / "whole"), check=True, capture_output=True, env=ENV, cwd=ROOT)
    rows = [json.loads(line) for line in (tmp_path / "whole" / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2, 3, 4] and [r["step"] for r in rows] == [2, 4, 6, 8]
    for key in (
        "score",
        "kl",
        "kl_coef",
        "policy_loss",
        "value_loss",
        "clip_fraction",
        "approx_kl",
        "entropy",
        "response_len",
        "unfinished",
        "rollout_tokens_per_s",
        "train_tokens_per_s",
        "generate_s",
        "score_s",
        "experience_s",
        "train_s",
    ):
        assert all(math.isfinite(r[key]) for r in rows), key
    assert rows[0]["kl"] == 0 and rows[0]["kl_coef"] == 0.1  # π = π0 in the first round; the paper's λ
    assert rows[1]["kl_coef"] != 0.1  # the adaptive controller moved it
    final = tmp_path / "whole" / "final"
    assert (final / "value_head.safetensors").is_file() and (final / "tokenizer.model").is_file()
    card = (final / "README.md").read_text(encoding="utf-8")  # issue 26: the model card, with the run's figures
    assert "# HuatuoGPT, PPO checkpoint" in card and "optimizer steps" in card and "本模型不提供医疗建议" in card
    hf = LlamaForCausalLM.from_pretrained(final)  # opens in any LLaMA tooling
    ours = load_file(final / "model.safetensors")
    assert torch.equal(hf.model.layers[3].mlp.up_proj.weight, ours["model.layers.3.mlp.up_proj.weight"])
    sft = load_file(checkpoints / "sft" / "model.safetensors")
    assert torch.equal(ours["model.layers.0.self_attn.q_proj.weight"], sft["model.layers.0.self_attn.q_proj.weight"])
    assert not torch.equal(
        ours["model.layers.3.self_attn.q_proj.weight"], sft["model.layers.3.self_attn.q_proj.weight"]
    )

    out = tmp_path / "killed"
    proc = subprocess.Popen(
        cli(checkpoints, out), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV, cwd=ROOT
    )
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if (out / "metrics.jsonl").is_file() and len((out / "metrics.jsonl").read_text().splitlines()) >= 2:
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, "the run ended before it could be killed"
    saved = json.loads((out / "state" / "trainer.json").read_text())
    assert 1 <= saved["round"] < 4
    with pytest.raises(subprocess.CalledProcessError) as refused:
        subprocess.run(
            cli(checkpoints, out, "--resume", "--lr", "2e-3"),
            check=True,
            capture_output=True,
            text=True,
            env=ENV,
            cwd=ROOT,
        )
    assert "lr: 0.001 -> 0.002" in refused.value.stderr
    subprocess.run(cli(checkpoints, out, "--resume"), check=True, capture_output=True, env=ENV, cwd=ROOT)
    assert (out / "metrics.jsonl").read_text().count("\n") == 4

    def strip(r):  # timings differ
        return {k: v for k, v in r.items() if not k.endswith(("_s", "per_s"))}

    assert [strip(json.loads(line)) for line in (out / "metrics.jsonl").read_text().splitlines()] == [
        strip(r) for r in rows
    ]
    a, b = load_file(final / "model.safetensors"), load_file(out / "final" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    va, vb = load_file(final / "value_head.safetensors"), load_file(out / "final" / "value_head.safetensors")
    assert torch.equal(va["weight"], vb["weight"])

    # Issue 33: SIGUSR1 (as `sbatch --signal=USR1@120` sends it) stops the run at the end of the
    # round it reaches, its state saved, exit status 75; the same command, without --resume,
    # then resumes it, and the run ends as the uninterrupted one did.
    out = tmp_path / "preempted"
    proc = subprocess.Popen(
        cli(checkpoints, out), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV, cwd=ROOT
    )
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None and not (out / "metrics.jsonl").is_file():
        time.sleep(0.02)
    proc.send_signal(signal.SIGUSR1)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 75, (proc.returncode, stderr[-2000:])
    saved = json.loads((out / "state" / "trainer.json").read_text())["round"]
    assert 1 <= saved < 4 and (out / "preempted").read_text().strip() == f"round {saved}"
    assert (out / "metrics.jsonl").read_text().count("\n") == saved and "stopped by SIGUSR1" in stdout
    again = subprocess.run(cli(checkpoints, out), capture_output=True, text=True, env=ENV, cwd=ROOT)
    assert again.returncode == 0 and f"stopped after round {saved}: resuming it" in again.stdout, again.stderr[-2000:]
    assert [strip(json.loads(line)) for line in (out / "metrics.jsonl").read_text().splitlines()] == [
        strip(r) for r in rows
    ]
    b = load_file(out / "final" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_ppo_stops_on_a_broken_update_keeps_the_last_finite_state_and_exports_nothing(
    checkpoints, tmp_path, monkeypatch
):
    """Issue 44 item 2: PPO had no step guard: --lr 1e30 logged policy_loss NaN, said "done",
    exited 0 and exported final/ with non-finite tensors. Now it stops as SFT and RM do: one
    line naming the round and the step, the state left at the last finite one, nothing
    exported. (Rounds of 2 optimizer steps here, a state after each.)"""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    with pytest.raises(SystemExit) as stop:
        train_ppo.main(cli(checkpoints, tmp_path / "lr", "--lr", "1e30")[2:])
    assert re.match(r"round 1, step 2: loss nan / gradient norm nan is not finite", str(stop.value)), stop.value
    assert "none, no state was saved yet" in str(stop.value) and not (tmp_path / "lr" / "final").exists()

    poison_update(monkeypatch, train_ppo, at=8)  # the last update: no later loss would show it
    out = tmp_path / "last"
    with pytest.raises(SystemExit) as stop:
        train_ppo.main(cli(checkpoints, out)[2:])
    message = str(stop.value)
    assert message.startswith("round 4, step 8: the update left weights or optimizer state that are not finite")
    assert f"The last good state: {out / 'state'} (round 3, step 6)" in message, message
    assert json.loads((out / "state" / "trainer.json").read_text())["step"] == 6 and not (out / "final").exists()


def test_two_nodes_run_ppo_as_one_node_of_two_ranks(checkpoints, tmp_path):
    """Issue 33 item 2: a PPO round on 2 nodes of 1 rank (two torchruns meeting by a c10d
    rendezvous on loopback) gives what 1 node of 2 ranks gives, to the bit: every rank's
    prompts and sampling seed go by its global rank (train_ppo.collect_experiences)."""
    from safetensors.torch import load_file

    args = cli(checkpoints, tmp_path / "one-node", "--max-steps", "2")[1:]
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *args],
        capture_output=True,
        text=True,
        env=trainer_env(2),
        cwd=ROOT,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    node = cli(checkpoints, tmp_path / "two-nodes", "--max-steps", "2")[2:]
    for proc in two_nodes("train_ppo.py", node, node):
        assert proc.returncode == 0, proc.stderr[-3000:]

    def strip(r):  # timings differ
        return {k: v for k, v in r.items() if not k.endswith(("_s", "per_s"))}

    rows = [
        [strip(json.loads(line)) for line in (tmp_path / o / "metrics.jsonl").read_text().splitlines()]
        for o in ("one-node", "two-nodes")
    ]
    assert rows[0] == rows[1] and len(rows[0]) == 1, rows
    a, b = (load_file(tmp_path / o / "final" / "model.safetensors") for o in ("one-node", "two-nodes"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_prompt_at_the_edge_of_the_context_and_max_steps_inside_a_round(checkpoints, tmp_path, tokenizer_file):
    """Issue 23: a prompt of exactly the context less --max-new-tokens was accepted, and its cut
    response with the reward model's eos was one token over the context: the run crashed, and
    --resume replayed the same round into the same crash. And --max-steps ran whole rounds."""
    from data.template import render
    from tokenizer import Tokenizer

    tok = Tokenizer(tokenizer_file)
    long_question = ("头痛发热咳嗽" * 100)[:360]
    edge = len(render(tok, [{"role": "user", "content": long_question}]).ids)  # 504 with this tokenizer
    new_tokens = 512 - edge  # the old rule let this prompt in; a cut response + eos is 513 tokens
    rows = [
        {
            "id": "long",
            "source": "t",
            "messages": [{"role": "user", "content": long_question}, {"role": "assistant", "content": "请就医。"}],
        }
    ]
    rows += [
        {
            "id": f"q{i}",
            "source": "t",
            "messages": [{"role": "user", "content": f"头痛{i}天了"}, {"role": "assistant", "content": "多休息。"}],
        }
        for i in range(7)
    ]
    data = tmp_path / "sft.jsonl"
    data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    cmd = [
        sys.executable,
        str(ROOT / "train_ppo.py"),
        "--policy",
        str(checkpoints / "sft"),
        "--reward",
        str(checkpoints / "rm"),
        "--data",
        str(data),
        "--out",
        str(tmp_path / "run"),
        "--max-steps",
        "3",
        "--rollout-size",
        "4",
        "--chunk-size",
        "4",
        "--batch-size",
        "2",
        "--ppo-epochs",
        "1",
        "--max-new-tokens",
        str(new_tokens),
        "--lr",
        "1e-3",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=ENV, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"question longer than the context less --max-new-tokens ({edge - 1} tokens)" in proc.stdout
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in metrics] == [2, 3]  # 2 steps a round, and the second round stops at 3
    assert json.loads((tmp_path / "run" / "state" / "trainer.json").read_text())["step"] == 3


def test_rl_prompts_are_every_patient_turn_deduplicated_minus_the_reward_models(tmp_path, tokenizer_file):
    """§3.2: "Input queries are de-duplicated and sampled from the remaining SFT hybrid data"."""
    from data.schema import Report
    from data.template import render
    from tokenizer import Tokenizer

    def conv(id, *turns):
        roles = ["user", "assistant"] * len(turns)
        return {"id": id, "source": "t", "messages": [{"role": r, "content": t} for r, t in zip(roles, turns)]}

    sft = tmp_path / "sft.jsonl"
    rows = [
        conv("a", "头痛", "多久了？", "三天", "去医院。"),
        conv("b", "头痛", "别担心。"),
        conv("c", "咳嗽", "多喝水。"),
    ]
    sft.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(
        json.dumps(
            {
                "id": "p",
                "source": "preference",
                "messages": [{"role": "user", "content": "咳嗽"}],
                "chosen": "x",
                "rejected": "y",
            },
            ensure_ascii=False,
        )
        + "\n",
        encoding="utf-8",
    )
    tok, report = Tokenizer(tokenizer_file), Report()
    got = ppo_setup.read_prompts([sft], [pairs], tok, 1000, report)
    # a's two patient turns (the second with its history), b's question = a's first: kept once;
    # c's question is a reward-model prompt: left out.
    want = [
        [{"role": "user", "content": "头痛"}],
        [
            {"role": "user", "content": "头痛"},
            {"role": "assistant", "content": "多久了？"},
            {"role": "user", "content": "三天"},
        ],
    ]
    got = list(got)
    assert sorted(got) == sorted(render(tok, m).ids for m in want)
    assert "a prompt of the reward model's pairs" in report.summary()
    # Issue 34 item 1: train_ppo.py writes them once into its data cache and every rank maps
    # them (452,141 prompts at the paper's size held 10 GB a rank as lists): the same prompts,
    # in the same order, as lists of ids, and the same report.
    from data.corpus import Corpus
    from training import rendered_once
    from distributed import init_distributed

    d, cached = init_distributed(), Report()
    try:
        entry, meta = rendered_once(
            None,
            tmp_path / "run",
            {"k": 1},
            lambda: ({"prompts": ppo_setup.read_prompts([sft], [pairs], tok, 1000, cached)}, cached),
            d,
            labels=False,
        )
    finally:
        d.close()
    prompts = Corpus(entry / "prompts")
    assert [prompts[i] for i in range(len(prompts))] == got and prompts[-1] == got[-1]
    assert all(type(t) is int for t in prompts[0]) and meta["summary"] == report.summary()
    assert sorted(p.name for p in (entry / "prompts").iterdir()) == ["ids.int32", "offsets.int64"]  # no labels


@pytest.mark.numerics
def test_a_rounds_responses_are_the_same_whatever_the_rows_and_no_row_waits_for_a_chunk(ppo):
    """Issue 36 item 5: the rollout generated --chunk-size prompts together until the chunk's
    longest response ended, its ended rows stepping on (44-47% of the row-steps for a realistic
    spread of lengths). Now a row whose response ended takes the next prompt, and each prompt
    samples from a generator of its own (the run's seed, the round, its place in it): the
    round's responses are the same, token for token, with 2, 3 or 8 rows (fp64), in no more
    decoding steps than a chunk at a time would have taken for the same responses."""
    n, responses = 12, {}
    for rows in (2, 3, 8):
        args = args_for(chunk_size=rows, max_new_tokens=12)
        exps, info = train_ppo.rollout(
            ppo.model, TokenReward(5), prompts(n, 1), Tok(), RolloutSettings.of(args), ppo.d, round_no=1
        )
        responses[rows] = [e.response for e in exps]
        # Decoding steps (each prompt's first token comes from its prefill): the queue's, from
        # the rows it kept busy, against a chunk at a time's, each chunk as long as its longest.
        lengths = [len(r) for r in responses[rows]]
        queued = sum(k - 1 for k in lengths) / (rows * (1 - info["idle_rows"]))
        chunked = sum(max(lengths[i : i + rows]) - 1 for i in range(0, n, rows))
        assert 0 <= info["idle_rows"] < 1 and queued <= chunked + 1e-9, (rows, queued, chunked)
    assert responses[2] == responses[3] == responses[8]
    assert len({len(r) for r in responses[2]}) > 1  # responses of several lengths: rows were freed and refilled


# -- a reward model of another tokenizer and prompt format (issue 46 item 3) ------------------------------


@pytest.fixture(scope="module")
def foreign_rm(tmp_path_factory):
    """A reward model as convert.py writes the released one: another sentencepiece vocabulary
    (460 pieces, trained here), a head with a bias, prompt format "ziya-rm", a context of 96."""
    from conftest import CORPUS

    from model import RewardModel
    from tokenizer import train_tokenizer

    root = tmp_path_factory.mktemp("foreign_rm")
    tok = train_tokenizer(CORPUS[::-1], root / "src" / "tokenizer.model", vocab_size=460)
    config = ModelConfig(
        vocab_size=len(tok) + 1,  # an added token past the pieces, as the released one's
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=96,
        rope_theta=500.0,
    )
    rm = RewardModel(config, bias=True, prompt_format="ziya-rm")
    rm.trunk.init_weights(3)
    sharpen_(rm.trunk)
    torch.nn.init.normal_(rm.score_head.weight, std=1.0, generator=torch.Generator().manual_seed(4))
    torch.nn.init.constant_(rm.score_head.bias, 0.5)
    save_model(rm, root / "rm", tokenizer=tok)
    return root / "rm"


def test_a_reward_model_of_another_tokenizer_scores_each_response_as_its_text_alone(foreign_rm, tokenizer_file):
    """Every score through text equals the reward model run alone, unpadded, on the ids its own
    tokenizer gives the decoded response in its format, written out by hand (fp64); a text
    longer than its context is cut to it, eos last, and counted."""
    from tokenizer import Tokenizer

    policy_tok = Tokenizer(tokenizer_file)
    rm = load_reward_model(foreign_rm, dtype=torch.float64).eval()
    scorer = train_ppo.reward_scorer(foreign_rm, rm, policy_tok)
    assert isinstance(scorer, train_ppo.TextReward) and scorer.tok.path != policy_tok.path
    assert train_ppo.reward_by_text(foreign_rm, policy_tok) == "its prompt format is ziya-rm"
    rm_tok = scorer.tok
    conversations = [
        [{"role": "user", "content": "头痛三天了怎么办？"}],
        [
            {"role": "user", "content": "孩子发烧"},
            {"role": "assistant", "content": "多少度？"},
            {"role": "user", "content": "38度"},
        ],
        [{"role": "user", "content": "高血压患者应当低盐饮食吗？"}],
    ]
    g = torch.Generator().manual_seed(0)
    responses = [torch.randint(3, 400, (n,), generator=g).tolist() for n in (5, 9, 70)]
    responses[0].append(policy_tok.eos_id)
    exps = [Experience(render_ids(policy_tok, m), r, r[-1] == 2, messages=m) for m, r in zip(conversations, responses)]
    train_ppo.score_round(scorer, exps, policy_tok, batch_size=2)
    for e in exps:
        question = "\n\nHuman:".join(
            m["content"] + ("\n\nAssistant:" + e.messages[i + 1]["content"] if i + 1 < len(e.messages) else "")
            for i, m in enumerate(e.messages)
            if m["role"] == "user"
        )
        text = "Human:" + question + "\n\nAssistant:" + policy_tok.sp.decode([t for t in e.response if t != 2])
        ids = [1] + rm_tok.sp.encode(text) + [2]
        if len(ids) > 96:  # the third: cut to the context, eos kept last
            ids = ids[:95] + [2]
        with torch.no_grad():
            alone = rm(torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long)).item()
        assert e.score == pytest.approx(max(-10.0, min(10.0, alone)), abs=1e-10)
        assert e.reward_cut == (e is exps[2])


def render_ids(tok, messages):
    from data.template import render

    return render(tok, messages).ids


def test_ppo_against_a_reward_model_of_another_tokenizer_runs_the_same_on_1_and_2_ranks(
    checkpoints, foreign_rm, tmp_path
):
    """A PPO round against the foreign reward model, chosen by its checkpoint alone (no flag):
    it says it scores through text, the round's figures on 2 ranks equal 1 rank's."""
    rows = []
    for ranks in (1, 2):
        args = cli(checkpoints, tmp_path / f"r{ranks}", "--max-steps", "2")
        args[args.index("--reward") + 1] = str(foreign_rm)
        if ranks == 2:
            args = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *args[1:]]
        proc = subprocess.run(args, capture_output=True, text=True, env=trainer_env(ranks), cwd=ROOT, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert "scoring through text: its prompt format is ziya-rm" in proc.stdout
        rows.append([json.loads(line) for line in (tmp_path / f"r{ranks}" / "metrics.jsonl").read_text().splitlines()])
    (one,), (two,) = rows
    for key in ("score", "kl", "response_len", "unfinished", "reward_cut", "policy_loss", "value_loss", "entropy"):
        assert two[key] == pytest.approx(one[key], rel=1e-4, abs=1e-5), key
    assert one["score"] != 0
