"""Batched KV-cache generation: exact against a no-cache recompute and transformers' generate."""

import pytest
import torch
from conftest import make_pair

from generate import CompiledStep, decode_steps, generate, process_logits, stream
from model import RMSNorm, token_logprobs

PROMPTS = [[1, 17, 33, 54, 9, 71, 40, 12, 88, 25], [1, 64, 7, 99], [1, 5, 45, 66, 30, 21]]


def greedy_no_cache(model, prompt, n):
    """The slow definition: rerun the whole sequence for every new token, no cache, no padding."""
    seq = list(prompt)
    for _ in range(n):
        with torch.no_grad():
            seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
    return seq[len(prompt) :]


@pytest.mark.numerics
def test_greedy_equals_no_cache_and_transformers(pair):
    ours, hf = pair
    got = generate(ours, PROMPTS, max_new_tokens=20, eos_id=-1, temperature=0)  # -1: never stops
    for prompt, tokens in zip(PROMPTS, got.tokens):
        assert tokens == greedy_no_cache(ours, prompt, 20)
        ref = hf.generate(torch.tensor([prompt]), max_new_tokens=20, do_sample=False, eos_token_id=None, pad_token_id=0)
        assert tokens == ref[0, len(prompt) :].tolist()
    assert len({tuple(t) for t in got.tokens}) == 3  # the prompts really lead different ways


@pytest.mark.numerics
def test_repetition_penalty_matches_transformers(pair):
    ours, hf = pair
    got = generate(ours, PROMPTS, max_new_tokens=15, eos_id=-1, temperature=0, repetition_penalty=1.5)
    for prompt, tokens in zip(PROMPTS, got.tokens):
        ref = hf.generate(
            torch.tensor([prompt]),
            max_new_tokens=15,
            do_sample=False,
            repetition_penalty=1.5,
            eos_token_id=None,
            pad_token_id=0,
        )
        assert tokens == ref[0, len(prompt) :].tolist()
    plain = generate(ours, PROMPTS, max_new_tokens=15, eos_id=-1, temperature=0)
    assert got.tokens != plain.tokens


@pytest.mark.numerics
@pytest.mark.parametrize("kv_heads", [4, 1])
def test_prompt_decodes_the_same_alone_and_in_a_padded_batch(kv_heads):
    # fp64: alone and in a batch the matmuls have other shapes, so other kernel blockings and
    # summation orders. In fp32 that moved these log-probs by 1.4e-5 on an AVX-512 machine and
    # by less on AVX2 ones; in fp64 the two orders differ by ~1e-15 and 1e-9 is rounding-free
    # (tests/TOLERANCES.md: the one fp32 step left, RMSNorm's input, rounds both alike).
    ours, _ = make_pair(dtype=torch.float64, num_key_value_heads=kv_heads)
    batch = generate(ours, PROMPTS, max_new_tokens=12, eos_id=-1, temperature=0, return_logprobs=True)
    for i, prompt in enumerate(PROMPTS):
        alone = generate(ours, [prompt], max_new_tokens=12, eos_id=-1, temperature=0, return_logprobs=True)
        assert alone.tokens[0] == batch.tokens[i]
        torch.testing.assert_close(
            torch.tensor(alone.logprobs[0], dtype=torch.float64),
            torch.tensor(batch.logprobs[i], dtype=torch.float64),
            rtol=0,
            atol=1e-9,
        )


@pytest.mark.numerics
def test_logprobs_are_the_models_log_probabilities(small_model):
    # Whatever filters chose the tokens (temperature, top-p, ids past vocab_limit), the log-probs
    # are model.token_logprobs of a training forward over the same ids: full vocabulary, fp32.
    model = small_model.double()
    gen = torch.Generator().manual_seed(0)
    out = generate(
        model,
        PROMPTS,
        max_new_tokens=8,
        eos_id=-1,
        temperature=0.9,
        top_p=0.8,
        vocab_limit=60,
        return_logprobs=True,
        generator=gen,
    )
    for prompt, tokens, lps in zip(PROMPTS, out.tokens, out.logprobs):
        assert max(tokens) < 60
        with torch.no_grad():
            logits = model(torch.tensor([prompt + tokens]))[0, len(prompt) - 1 : -1]
        expected = token_logprobs(logits, torch.tensor(tokens))
        torch.testing.assert_close(torch.tensor(lps, dtype=torch.float64), expected, rtol=0, atol=1e-9)  # fp64
        # ... which is the log-softmax over all 101 ids, not over the 60 that could be sampled.
        by_hand = torch.log_softmax(logits, -1).gather(-1, torch.tensor(tokens)[:, None]).squeeze(-1)
        torch.testing.assert_close(expected, by_hand, rtol=0, atol=1e-12)  # one fp64 logit row, two formulas
        renormalised = torch.log_softmax(logits[:, :60], -1).gather(-1, torch.tensor(tokens)[:, None]).squeeze(-1)
        assert (renormalised - by_hand).min() > 1e-3


@pytest.mark.numerics
def test_token_logprobs_in_fp32_from_bf16_logits():
    logits = torch.randn(4, 7, 1000, generator=torch.Generator().manual_seed(0)) * 3
    targets = torch.randint(0, 1000, (4, 7))
    exact = torch.log_softmax(logits.double(), -1).gather(-1, targets[..., None]).squeeze(-1)
    got = token_logprobs(logits.bfloat16(), targets)
    assert got.dtype == torch.float32
    # Only the bf16 rounding of the logits themselves remains (|x| < 16: 2^-8 * 16 / 2 = 0.03).
    assert (got.double() - exact).abs().max() < 0.1
    torch.testing.assert_close(token_logprobs(logits.double(), targets), exact, rtol=0, atol=1e-12)


@pytest.mark.numerics
def test_each_sequence_stops_at_its_own_eos(pair):
    ours, _ = pair
    free = generate(ours, PROMPTS, max_new_tokens=12, eos_id=-1, temperature=0)
    eos = free.tokens[1][3]  # make the 4th token of the second prompt the "eos"
    stop = free.tokens[1].index(eos)
    out = generate(ours, PROMPTS, max_new_tokens=12, eos_id=eos, temperature=0)
    assert out.tokens[1] == free.tokens[1][: stop + 1] and out.finished[1]
    for i in (0, 2):  # the others go on, unchanged, until their own eos or the limit
        cut = free.tokens[i].index(eos) + 1 if eos in free.tokens[i] else 12
        assert out.tokens[i] == free.tokens[i][:cut]
        assert out.finished[i] == (eos in free.tokens[i])


@pytest.mark.numerics
def test_a_seeded_batch_draws_the_same_tokens_whether_its_ended_rows_run_or_have_left(pair):
    """A fixed batch is the queue whose prompts all start at once, and a row whose response
    ended leaves it. With one generator for the batch, the rows that go on must still draw what
    they drew when nothing ended (as torch.multinomial over the whole batch drew): each seat has
    its own noise row, whatever rows are left. (Compiled, whose ended rows keep their places:
    test_compiled_decoding_equals_eager.)"""
    ours, _ = pair
    kw = dict(max_new_tokens=12, temperature=1.0, top_p=0.9)
    free = generate(ours, PROMPTS, eos_id=-1, generator=torch.Generator().manual_seed(3), **kw).tokens
    eos = free[0][2]  # the first prompt's third token, taken as the eos: that row ends there
    out = generate(ours, PROMPTS, eos_id=eos, generator=torch.Generator().manual_seed(3), **kw)
    for got, want in zip(out.tokens, free):
        assert got == want[: want.index(eos) + 1 if eos in want else len(want)]
    assert len(out.tokens[0]) == 3 and any(len(t) > 3 for t in out.tokens[1:])


@pytest.mark.numerics
def test_sampling_is_seeded_and_streams_the_same_tokens(small_model):
    kw = dict(max_new_tokens=10, eos_id=-1, temperature=1.0, top_k=20)
    a = generate(small_model, PROMPTS[:1], generator=torch.Generator().manual_seed(5), **kw).tokens[0]
    b = list(stream(small_model, PROMPTS[0], generator=torch.Generator().manual_seed(5), **kw))
    c = generate(small_model, PROMPTS[:1], generator=torch.Generator().manual_seed(6), **kw).tokens[0]
    assert a == b and a != c


def test_vocab_limit_and_context_guard(small_model):
    out = generate(
        small_model,
        PROMPTS,
        max_new_tokens=30,
        eos_id=-1,
        temperature=2.0,
        vocab_limit=50,
        generator=torch.Generator().manual_seed(0),
    )
    assert max(max(t) for t in out.tokens) < 50
    with pytest.raises(ValueError, match="exceeds the model's context of 256"):
        generate(small_model, PROMPTS, max_new_tokens=250, eos_id=-1)
    with pytest.raises(ValueError, match="at least one token"):
        next(decode_steps(small_model, [[1], []], max_new_tokens=2, eos_id=2))


@pytest.mark.numerics
def test_process_logits_by_hand():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0, -3.0]])
    probs = torch.softmax(logits, -1)[0]  # 0.6364, 0.2341, 0.0861, 0.0317, 0.0043
    # top_p 0.8: 0.636 < 0.8, 0.636 + 0.234 = 0.870 crosses it: the two first survive.
    kept = torch.isfinite(process_logits(logits, None, top_p=0.8))[0].tolist()
    assert kept == [True, True, False, False, False]
    assert probs[0] < 0.8 < probs[0] + probs[1]
    # top_p below the first probability keeps exactly the argmax.
    assert torch.isfinite(process_logits(logits, None, top_p=0.1))[0].tolist() == [True] + [False] * 4
    assert torch.isfinite(process_logits(logits, None, top_k=3))[0].tolist() == [True] * 3 + [False] * 2
    # temperature divides (x / 0.5 is exact in binary).
    torch.testing.assert_close(process_logits(logits, None, temperature=0.5), logits * 2, rtol=0, atol=0)
    # repetition penalty 2 on tokens 0 and 3: 2.0 -> 1.0 and -1.0 -> -2.0; others untouched.
    seen = torch.tensor([[True, False, False, True, False]])
    out = process_logits(logits, seen, repetition_penalty=2.0)
    torch.testing.assert_close(out, torch.tensor([[1.0, 1.0, 0.0, -2.0, -3.0]]), rtol=0, atol=0)  # exact in binary


def test_compiled_decoding_equals_eager(small_model, monkeypatch):
    # --compile: every step through torch.compile over a static cache. In fp64 it must give
    # the tokens and log-probs of the eager steps, for prompts padded together and for a
    # sampled run; the shapes do not depend on the step or, within a bucket, on the lengths,
    # so a second batch of other lengths compiles nothing new; and the weights are read, not
    # baked in: a model changed in place decodes with its new weights.
    from torch._dynamo.utils import counters

    model = small_model.double()
    other = [[1, 8, 2, 3], [1, 90, 14], [1, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3]]
    runs = [(PROMPTS, {"temperature": 0}), (other, {"temperature": 0}), (PROMPTS, dict(temperature=0.9, top_p=0.8))]

    def run(compiled, prompts, sampling, eos_id=-1):
        return generate(
            model,
            prompts,
            max_new_tokens=12,
            eos_id=eos_id,
            return_logprobs=True,
            generator=torch.Generator().manual_seed(3),
            compiled=step if compiled else None,
            **sampling,
        )

    torch._dynamo.reset()
    counters.clear()
    step = CompiledStep(model)  # held by the caller, as evaluate.Doctor holds it
    eager = [run(False, *r) for r in runs]
    compiled = [run(True, *r) for r in runs]
    # A sampled row that ends: eagerly its row leaves, compiled it keeps its place (one shape)
    # and steps on; the rows that go on draw the same tokens either way, and nothing compiles anew.
    eos = eager[2].tokens[0][2]
    for ended in (run(False, *runs[2], eos_id=eos), run(True, *runs[2], eos_id=eos)):
        assert ended.tokens == [t[: t.index(eos) + 1] if eos in t else t for t in eager[2].tokens]
        assert len(ended.tokens[0]) == 3
    with torch.no_grad():
        model.layers[1].mlp.up_proj.weight.mul_(-1)
    eager.append(run(False, *runs[0]))
    compiled.append(run(True, *runs[0]))

    # The one fp32 step of an fp64 model is RMSNorm (its input cast to fp32, as HF's is, whatever
    # the model's dtype), and the fused kernel evaluates it in another order. So the bound is
    # the effect of that step itself, measured here on this machine's kernels: the log-probs of
    # the eager steps with the norm in fp64 (`exact`) against the eager ones (~2e-6). The
    # compiled steps must be no further from `exact` than 4 times that.
    def norm_in_fp64(self, x):
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x

    with torch.no_grad():
        model.layers[1].mlp.up_proj.weight.mul_(-1)  # back to the weights of the first runs
    monkeypatch.setattr(RMSNorm, "forward", norm_in_fp64)
    exact = [run(False, *r) for r in runs]
    with torch.no_grad():
        model.layers[1].mlp.up_proj.weight.mul_(-1)
    exact.append(run(False, *runs[0]))

    def flat(g):
        return torch.tensor(sum(g.logprobs, []), dtype=torch.float64)

    for a, b, x in zip(eager, compiled, exact):
        assert a.tokens == b.tokens == x.tokens
        rounding = (flat(a) - flat(x)).abs().max().item()
        assert 0 < rounding < 1e-4 and (flat(b) - flat(x)).abs().max().item() <= 4 * rounding
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])
    assert eager[0].tokens != eager[2].tokens and eager[0].tokens != eager[3].tokens
