"""Run by tests/test_fsdp.py under `torchrun --nproc_per_node 2`: what PPO needs from a model
sharded with FSDP2, each rank checked against an unsharded copy of the same weights.

Each check prints `ok NAME` on rank 0 when it holds on every rank; a failed check raises. The
model is in fp64 wherever results are compared, so the bounds are rounding-free (1e-9).
"""

import copy
import shutil
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from conftest import sharpen_  # noqa: E402
from generate import generate  # noqa: E402
from model import KVCache, ModelConfig, Transformer, token_logprobs  # noqa: E402
from pretrained import save_model  # noqa: E402
from costs import gradient_bytes  # noqa: E402
from simulate import StandInTokenizer  # noqa: E402
from distributed import exit_trainer, init_distributed, shard  # noqa: E402

CONFIG = ModelConfig(
    vocab_size=101,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    rope_theta=500.0,
)
TOL = dict(rtol=1e-9, atol=1e-9)


def _sharded_pair(dtype):
    """(unsharded reference, sharded copy) with the same sharp weights on every rank."""
    torch.manual_seed(0)
    ref = sharpen_(Transformer(CONFIG)).to(dtype)
    model = copy.deepcopy(ref)
    return ref, shard(model, model.layers, bf16=False)


def ok(d, name):
    dist.barrier()
    if d.main:
        print(f"ok {name}", flush=True)


def batch(d, n=3, length=12):
    """Different tokens on each rank, the second row left-padded."""
    gen = torch.Generator().manual_seed(100 + d.rank)
    tokens = torch.randint(3, 101, (n, length), generator=gen)
    mask = torch.ones(n, length, dtype=torch.long)
    mask[1, :4] = 0
    return tokens, mask


def check_sliced_forward(d):
    ref, model = _sharded_pair(torch.float64)
    tokens, mask = batch(d)
    with torch.no_grad():
        expected = ref(tokens, mask)

        def sliced():
            h = model(tokens, mask, last_layer=2, output="residual")
            return model(hidden=h, attention_mask=mask, first_layer=2)

        torch.testing.assert_close(sliced(), expected, **TOL)  # a fresh sharded model
    model(tokens, mask).sum().backward()  # ... and after a full forward and backward
    with torch.no_grad():
        torch.testing.assert_close(sliced(), expected, **TOL)
    # Gradients through the top alone, the bottom run without them (PPO's frozen trunk). After
    # a no_grad forward FSDP2 keeps the root's weights gathered, and model.parameters() yields
    # those unsharded copies: reshard first, or zero_grad misses the sharded gradients (which
    # the next backward would then add to).
    model.reshard()
    model.zero_grad(set_to_none=True)
    weights = torch.linspace(-1, 1, 101, dtype=torch.float64)
    for m in (model, ref):
        with torch.no_grad():
            h = m(tokens, mask, last_layer=2, output="residual")
        (m(hidden=h, attention_mask=mask, first_layer=2) * weights).sum().backward()
    # FSDP averages gradients over ranks; the reference's average is that of both ranks' own.
    for p in ref.parameters():
        if p.grad is not None:
            dist.all_reduce(p.grad)
            p.grad /= d.world
    for (name, p), (_, q) in zip(model.named_parameters(), ref.named_parameters()):
        if name.startswith(("layers.0.", "layers.1.", "embed_tokens")):
            assert p.grad is None and q.grad is None, name
        else:
            torch.testing.assert_close(p.grad.full_tensor(), q.grad, **TOL)
    ok(d, "sliced_forward")


def check_generation(d):
    ref, model = _sharded_pair(torch.float64)
    prompts = [[1, 17, 33, 54, 9], [1, 64, 7, 99, 12, 5, 45], [1, 66]] if d.rank == 0 else [[1, 30, 21], [1, 8, 8, 40]]
    kw = dict(max_new_tokens=10, eos_id=-1, temperature=0, return_logprobs=True)
    got, want = generate(model, prompts, **kw), generate(ref, prompts, **kw)
    assert got.tokens == want.tokens, (got.tokens, want.tokens)

    def as64(lps):
        return torch.tensor(lps, dtype=torch.float64)

    torch.testing.assert_close(as64(got.logprobs), as64(want.logprobs), **TOL)
    # Sampling leaves the model resharded: its parameters are the sharded ones an optimizer holds.
    assert all(isinstance(p, DTensor) for p in model.parameters())
    ok(d, "generation")

    # One rank finishes first: rank 0 gets one prompt whose second token is made the eos, while
    # rank 1 runs on; rank 0 must keep stepping (the others' all-gathers need it) and still
    # return only its two tokens.
    prompts = [[1, 90, 3]] if d.rank == 0 else [[1, 30, 21], [1, 8, 8, 40]]
    free = generate(ref, prompts, max_new_tokens=10, eos_id=-1, temperature=0).tokens
    everyone = [None] * d.world
    dist.all_gather_object(everyone, free)
    eos = everyone[0][0][1]
    assert eos != everyone[0][0][0] and all(eos not in seq[:8] for seq in everyone[1]), "pick another prompt"
    got = generate(model, prompts, max_new_tokens=10, eos_id=eos, temperature=0)
    want = generate(ref, prompts, max_new_tokens=10, eos_id=eos, temperature=0)
    assert got.tokens == want.tokens and got.finished == want.finished
    if d.rank == 0:
        assert got.tokens == [free[0][:2]] and got.finished == [True]
    else:
        assert all(len(t) >= 8 for t in got.tokens)
    ok(d, "generation_one_rank_finishes_first")

    # Sampling's log-probs are model.token_logprobs of a training forward on the same ids,
    # whatever filters chose the tokens (vocab_limit, top-p, temperature). (As many prompts on
    # each rank: every forward of a sharded model must run on all ranks.)
    prompts = [[1, 90, 3], [1, 12, 77, 3]] if d.rank == 0 else [[1, 30, 21], [1, 8, 8, 40]]
    out = generate(
        model,
        prompts,
        max_new_tokens=8,
        eos_id=-1,
        temperature=0.9,
        top_p=0.8,
        vocab_limit=50,
        return_logprobs=True,
        generator=torch.Generator().manual_seed(d.rank),
    )
    for prompt, tokens, lps in zip(prompts, out.tokens, out.logprobs):
        assert max(tokens) < 50
        with torch.no_grad():
            logits = model(torch.tensor([prompt + tokens]))[0, len(prompt) - 1 : -1]
        torch.testing.assert_close(
            torch.tensor(lps, dtype=torch.float64), token_logprobs(logits, torch.tensor(tokens)).double(), **TOL
        )
    ok(d, "generation_logprobs")


def held_gradient_bytes(model) -> int:
    """Bytes of gradient this rank holds: its sharded gradients and any unsharded buffers
    FSDP keeps while gradient sync is off."""
    total = 0
    for m in model.modules():
        group = m._get_fsdp_state()._fsdp_param_group if isinstance(m, FSDPModule) else None
        for fp in group.fsdp_params if group else ():
            held = [getattr(fp, "_unsharded_param", None), fp.unsharded_accumulated_grad]
            grads = [fp.sharded_param.grad, held[0].grad if held[0] is not None else None, held[1]]
            for g in grads:
                if g is not None:
                    g = g.to_local() if hasattr(g, "to_local") else g
                    total += g.numel() * g.element_size()
    return total


def check_gradient_memory(d):
    results = {}
    for grad_sync in ("every", "last"):
        _, model = _sharded_pair(torch.float64)  # fp64: the two orders of summation agree to TOL
        tokens, _ = batch(d, n=8, length=10)
        calls, held = [], []

        def loss_sum(model, chunk, pad_id, device):  # train_sft.batch_loss's place: row i of `tokens`
            if len(calls) == 1:  # after the first micro-batch's backward, before the second's forward
                held.append(held_gradient_bytes(model))
            rows = [x.ids[0] for x in chunk]
            calls.append(rows)
            return model(tokens[rows]).logsumexp(-1).sum()

        # 8 items, 2 ranks, micro-batches of 2: two micro-batches on each rank (train_sft's step).
        import train_sft
        from data.template import Rendered

        train_sft.batch_loss, real = loss_sum, train_sft.batch_loss
        try:
            train_sft.train_step(
                model,
                d,
                [Rendered([i], [-100, 1]) for i in range(8)],
                micro_batch=2,
                pad_id=0,
                grad_clip=1e9,
                grad_sync=grad_sync,
            )
        finally:
            train_sft.batch_loss = real
        # The model's figure is for fp32 gradients (4 bytes a parameter); fp64 ones take twice.
        expected = 2 * gradient_bytes(CONFIG.num_params(), world=d.world, grad_sync=grad_sync)
        assert len(calls) == 2 and len(held) == 1
        # Shards split dim 0 unevenly (101 vocabulary rows: 51 + 50), so a rank's share is
        # within a percent of the model's figure, and the ranks' sum is exact.
        total = torch.tensor([held[0]], dtype=torch.float64)
        dist.all_reduce(total)
        assert total.item() == expected * d.world and abs(held[0] - expected) < 0.01 * expected, (
            grad_sync,
            held[0],
            expected,
        )
        results[grad_sync] = {k: p.grad.full_tensor() for k, p in model.named_parameters()}
    for k, g in results["every"].items():  # the same gradient either way
        torch.testing.assert_close(results["last"][k], g, **TOL)
    ok(d, "gradient_memory")


def check_bf16_mixed_precision(d):
    """FSDP mixed precision: fp32 weights, bf16 compute. The KV cache takes the compute dtype,
    the outputs come back in fp32 (the root's output_dtype)."""
    torch.manual_seed(0)
    model = Transformer(CONFIG).init_weights(0)
    shard(model, model.layers, bf16=True)
    prompt = torch.tensor([[1, 17, 33, 54, 9]])
    cache = KVCache(CONFIG, 1, 16)
    with torch.no_grad():
        logits = model(prompt, cache=cache)
    assert cache.k[0].dtype == torch.bfloat16 and logits.dtype == torch.float32, (cache.k[0].dtype, logits.dtype)
    out = generate(model, [[1, 17, 33]], max_new_tokens=4, eos_id=-1, temperature=0)
    assert len(out.tokens[0]) == 4
    ok(d, "bf16_mixed_precision")


def check_ppo_update(d):
    """One PPO step on 2 ranks equals the same step computed by hand on an unsharded copy: the
    whole minibatch's clipped losses over its response tokens, one backward, clipping, AdamW."""
    from types import SimpleNamespace

    import train_ppo
    from model import PolicyWithValue
    from train_ppo import Experience, ppo_loss_sum, response_outputs
    from training import make_optimizer

    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    torch.manual_seed(0)
    sft = sharpen_(Transformer(CONFIG))
    state = {k: v.clone() for k, v in sft.state_dict().items()}
    model, ref = train_ppo.build(CONFIG, state if d.main else None, d)
    gen = torch.Generator().manual_seed(1)  # the same buffer on every rank
    exps = [
        Experience(
            [1] + torch.randint(3, 101, (2 + i % 4,), generator=gen).tolist(),
            torch.randint(3, 101, (1 + (3 * i) % 5,), generator=gen).tolist(),
            True,
            score=0.5 * i - 2,
        )
        for i in range(8)
    ]
    tok = StandInTokenizer(CONFIG.vocab_size)
    args = SimpleNamespace(
        batch_size=8,
        micro_batch_size=2,
        seed=0,
        ppo_epochs=1,
        clip_ratio=0.2,
        clip_value=0.2,
        vf_coef=1.0,
        grad_clip=0.5,
        grad_sync="every",
        chunk_size=4,
        score_batch_size=4,
        bottom_batch_size=4,
    )
    batches = train_ppo.minibatches(len(exps), args.batch_size, args.seed, 0)
    train_ppo.make_experience(
        model,
        ref,
        exps,
        batches,
        tok,
        d,
        0.1,
        micro_batch_size=args.micro_batch_size,
        bottom_batch_size=args.bottom_batch_size,
    )
    # Each rank holds what it made, its own experiences (its micro-batches); the hand computation
    # below wants all of them.
    fields = ("logp", "values", "advantages", "returns")
    mine = [(i, [getattr(e, f) for f in fields]) for i, e in enumerate(exps) if e.logp is not None]
    everyone = [None] * d.world
    dist.all_gather_object(everyone, mine)
    assert sorted(i for part in everyone for i, _ in part) == list(range(8))  # each made once, by one rank
    hand = [Experience(e.prompt, e.response, e.finished, e.score) for e in exps]
    for i, values in (x for part in everyone for x in part):
        for f, v in zip(fields, values):
            setattr(hand[i], f, v)
    plain = PolicyWithValue(Transformer(CONFIG), train_ppo.TRAINABLE_BLOCKS)
    plain.load_state_dict(
        {**{f"policy.{k}": v for k, v in state.items()}, "value_head.weight": torch.zeros(1, CONFIG.hidden_size)}
    )
    # Push the policy off π0 first so that ratios and clipping take part: the same nudge to both.
    with torch.no_grad():
        for name, p in plain.named_parameters():
            if name.startswith("policy.layers.3."):
                p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))))
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    set_model_state_dict(model, plain.state_dict(), options=StateDictOptions(full_state_dict=True))
    train_ppo.update(
        model,
        make_optimizer(model, 1e-2, 0.0),
        train_ppo.AdaptiveKL(0.1, None, 1),
        exps,
        batches,
        tok,
        train_ppo.UpdateSettings.of(args),
        d,
        0.0,
        1,
    )

    opt = make_optimizer(plain, 1e-2, 0.0)
    out = response_outputs(plain, hand, 0, "cpu")
    width = out["logp"].shape[1]

    def pad(name):
        return torch.stack([torch.nn.functional.pad(getattr(e, name), (0, width - len(e.response))) for e in hand])

    loss, _ = ppo_loss_sum(
        out["logp"], pad("logp"), out["values"], pad("values"), pad("advantages"), pad("returns"), out["mask"]
    )
    (loss / sum(len(e.response) for e in hand)).backward()
    torch.nn.utils.clip_grad_norm_([p for p in plain.parameters() if p.grad is not None], 0.5)
    opt.step()
    got = {k: v.full_tensor() for k, v in model.state_dict().items()}
    for k, v in plain.state_dict().items():
        torch.testing.assert_close(got[k], v, **TOL)
    assert not torch.equal(got["policy.layers.3.mlp.up_proj.weight"], state["layers.3.mlp.up_proj.weight"])
    torch.set_default_dtype(default)
    ok(d, "ppo_update")


def check_rollout_gathered(d):
    """PPO's rollout keeps the policy gathered (distributed.gathered): the same experiences as
    gathering every block at every step, each block all-gathered once per rollout rather than
    once per step, and every parameter sharded again afterwards."""
    from types import SimpleNamespace

    import train_ppo

    torch.manual_seed(0)
    sft = sharpen_(Transformer(CONFIG)).double()
    model, _ = train_ppo.build(CONFIG, sft.state_dict() if d.main else None, d)
    gen = torch.Generator().manual_seed(5)
    prompts = [[1] + torch.randint(3, 101, (3 + i,), generator=gen).tolist() for i in range(6)]

    class Tok:
        eos_id, pad_id = -1, 0

        def __len__(self):
            return CONFIG.vocab_size

    class NoReward:
        def score_ids(self, prompts, responses, **kw):
            return torch.zeros(len(prompts))

    def local_shapes():
        return {name: (isinstance(p, DTensor), tuple(p.to_local().shape)) for name, p in model.named_parameters()}

    before = local_shapes()  # sharded: a block's local rows are fewer than its global ones
    assert all(p.to_local().shape[0] < p.shape[0] for name, p in model.named_parameters() if "layers.3." in name)
    gathers = []
    name = "all_gather_single" if hasattr(dist, "all_gather_single") else "all_gather_into_tensor"  # FSDP2's
    real = getattr(dist, name)

    def counting(*a, **kw):
        gathers.append(1)
        return real(*a, **kw)

    setattr(dist, name, counting)
    runs = {}
    try:
        for reshard in (True, False):
            gathers.clear()
            args = SimpleNamespace(
                seed=0,
                chunk_size=3,
                score_batch_size=3,
                max_new_tokens=8,
                unfinished_penalty=0.0,
                reshard_in_rollout=reshard,
            )
            exps, _ = train_ppo.rollout(
                model, NoReward(), prompts, Tok(), train_ppo.RolloutSettings.of(args), d, round_no=0
            )
            runs[reshard] = ([e.response for e in exps], len(gathers))
    finally:
        setattr(dist, name, real)
    assert runs[True][0] == runs[False][0] and all(len(r) == 8 for r in runs[True][0])
    units = sum(isinstance(m, FSDPModule) for m in model.modules())
    # This rank's 3 prompts fill its 3 rows: a prefill each and 7 steps, each forward gathering
    # every block (the root, FSDP keeps gathered between forwards anyway), against each unit
    # once in all.
    assert runs[True][1] == (3 + 7) * (units - 1) + 1 and runs[False][1] == units, (runs, units)
    after = local_shapes()
    assert after == before, [k for k in after if after[k] != before[k]]
    ok(d, "rollout_gathered")


def check_ppo_setup_share(d):
    """Issue 22: PPO's setup sent rank 0's whole SFT state dict to every rank through
    broadcast_object_list (pickled; on NCCL staged in GPU memory: 52 GB to each of 8 GPUs at
    13B) to build π0's top. Now the bytes through object collectives during setup are a few
    KiB (FSDP's tensor names and shapes), and a rank other than 0 never holds more of the SFT
    weights than its shards, π0's top, and the one tensor being broadcast at a time."""
    import pickle

    from torch.distributed._tools.mem_tracker import MemTracker

    import train_ppo

    sent = []
    real = {
        name: getattr(dist, name)
        for name in ("broadcast_object_list", "all_gather_object", "gather_object", "scatter_object_list")
    }

    def counting(name):
        def call(*args, **kwargs):
            out = real[name](*args, **kwargs)
            sent.append(len(pickle.dumps(args[0])))  # the objects that went through, as this rank has them now
            return out

        return call

    torch.manual_seed(0)
    sft = sharpen_(Transformer(CONFIG))
    state = sft.state_dict() if d.main else None
    for name in real:
        setattr(dist, name, counting(name))
    try:
        with MemTracker() as tracker:
            model, ref = train_ppo.build(CONFIG, state, d)
        peak = tracker.get_tracker_snapshot("peak")[torch.device("cpu")]["Total"]
    finally:
        for name, fn in real.items():
            setattr(dist, name, fn)
    whole = sum(t.numel() * t.element_size() for t in sft.state_dict().values())
    assert sum(sent) < 8 * 1024, (sum(sent), sent, whole)  # the whole model: 545 KiB
    if d.rank != 0:
        shards = sum(p.to_local().numel() * p.element_size() for p in model.parameters())
        top = sum(t.numel() * t.element_size() for t in ref.state_dict().values())
        largest = max(t.numel() * t.element_size() for t in sft.state_dict().values())
        # At most: its shards (FSDP pads them to equal sizes), π0's top, and one tensor in flight
        # whole with its shard's copy; and 32 KiB of small tensors that come and go (a clean-clone
        # CI run under pytest-xdist once peaked 22.3 KiB over the rest). Holding the whole state dict
        # as well, as before #22, would add 533 KiB.
        assert peak <= shards + top + 2 * largest + 32 * 1024, (peak, shards, top, largest, whole)
    ok(d, "ppo_setup_share")


def check_frozen_bf16(d):
    """PPO's --frozen-bf16 under bf16 mixed precision (the GPU's code path, forced on the CPU):
    the frozen embedding and bottom blocks stored in bf16 and the trained top in fp32, and a
    round's numbers (the experience pass's log-probs, values and advantages, then an update's
    weights) the same to the bit as with the bottom stored in fp32, on each rank, since FSDP
    casts every weight to bf16 before it computes either way."""
    from types import SimpleNamespace

    import train_ppo
    from train_ppo import Experience
    from training import make_optimizer

    torch.manual_seed(0)
    state = sharpen_(Transformer(CONFIG)).state_dict()
    tok = StandInTokenizer(CONFIG.vocab_size)
    args = SimpleNamespace(
        batch_size=8,
        micro_batch_size=2,
        seed=0,
        ppo_epochs=1,
        clip_ratio=0.2,
        clip_value=0.2,
        vf_coef=1.0,
        grad_clip=0.5,
        grad_sync="every",
        chunk_size=4,
        score_batch_size=4,
        bottom_batch_size=4,
    )
    seen = {}
    for frozen_bf16 in (False, True):
        model, ref = train_ppo.build(CONFIG, state if d.main else None, d, bf16=True, frozen_bf16=frozen_bf16)
        dtypes = {n: p.dtype for n, p in model.named_parameters()}
        trained = {n for n, p in model.named_parameters() if p.requires_grad}
        assert trained and all((dtypes[n] == torch.float32) == (n in trained or not frozen_bf16) for n in dtypes), (
            dtypes
        )
        gen = torch.Generator().manual_seed(1)
        exps = [
            Experience(
                [1] + torch.randint(3, 101, (2 + i % 4,), generator=gen).tolist(),
                torch.randint(3, 101, (1 + (3 * i) % 5,), generator=gen).tolist(),
                True,
                score=0.5 * i - 2,
            )
            for i in range(8)
        ]
        batches = train_ppo.minibatches(len(exps), args.batch_size, args.seed, 0)
        train_ppo.make_experience(
            model,
            ref,
            exps,
            batches,
            tok,
            d,
            0.1,
            micro_batch_size=args.micro_batch_size,
            bottom_batch_size=args.bottom_batch_size,
        )
        made = [(e.logp, e.values, e.advantages) for e in exps if e.logp is not None]
        opt = make_optimizer(model, 1e-2, 0.0)
        train_ppo.update(
            model,
            opt,
            train_ppo.AdaptiveKL(0.1, None, 1),
            exps,
            batches,
            tok,
            train_ppo.UpdateSettings.of(args),
            d,
            0.0,
            1,
        )
        seen[frozen_bf16] = made, {n: p.to_local().clone() for n, p in model.named_parameters() if n in trained}
    (made32, top32), (made16, top16) = seen[False], seen[True]
    assert made32 and len(made32) == len(made16)
    for a, b in zip(made32, made16):
        for x, y in zip(a, b):
            assert torch.equal(x, y), (x, y)
    assert top32.keys() == top16.keys() and all(torch.equal(top32[n], top16[n]) for n in top32)
    assert not torch.equal(
        top32["policy.layers.3.mlp.up_proj.weight"], state["layers.3.mlp.up_proj.weight"].chunk(d.world)[d.rank]
    )  # it trained
    ok(d, "frozen_bf16")


def check_reward_sharded(d):
    """PPO's reward model sharded over the ranks (train_ppo.load_reward, --reward-placement
    sharded, the default) scores as the whole model does: fp64, each rank its own prompts and
    reply lengths, left-padded and not; a rank holds its shard of every weight, and after
    scoring (train_ppo.score_round) nothing is left gathered."""
    import tempfile
    from types import SimpleNamespace

    import train_ppo
    from model import RewardModel

    torch.manual_seed(0)
    whole = RewardModel(CONFIG)
    sharpen_(whole.trunk)
    with torch.no_grad():
        whole.score_head.weight.normal_(0, 1.0)
    where = [tempfile.mkdtemp(prefix="huatuo-rm-")] if d.main else [None]
    dist.broadcast_object_list(where)  # a path: a few bytes
    if d.main:
        save_model(whole, where[0])
    dist.barrier()
    sharded = train_ppo.load_reward(where[0], CONFIG, d, torch.float64)
    replicated = train_ppo.load_reward(where[0], CONFIG, d, torch.float64, sharded=False)
    assert all(
        isinstance(p, DTensor) and p.to_local().shape[0] <= -(-p.shape[0] // d.world) for p in sharded.parameters()
    )
    assert not any(isinstance(p, DTensor) for p in replicated.parameters())
    gen = torch.Generator().manual_seed(10 + d.rank)
    prompts = [[1] + torch.randint(3, 101, (n,), generator=gen).tolist() for n in (5, 11, 3)]
    replies = [torch.randint(3, 101, (n,), generator=gen).tolist() for n in (4, 1, 9)]
    with torch.no_grad():
        want = replicated.score_ids(prompts, replies, eos_id=2, pad_id=0)
        got = sharded.score_ids(prompts, replies, eos_id=2, pad_id=0)
    torch.testing.assert_close(got, want, **TOL)
    assert want.abs().min() > 1e-3  # not a comparison of zeros
    exps = [train_ppo.Experience(p, r, True) for p, r in zip(prompts, replies)]
    train_ppo.score_round(sharded, exps, SimpleNamespace(eos_id=2, pad_id=0), batch_size=2, unfinished_penalty=0.0)
    scores = torch.tensor([e.score for e in exps], dtype=torch.float64)
    torch.testing.assert_close(scores, want.clamp(-train_ppo.SCORE_CLIP, train_ppo.SCORE_CLIP), **TOL)
    assert all(isinstance(p, DTensor) for p in sharded.parameters())  # resharded, the root too
    dist.barrier()
    if d.main:
        shutil.rmtree(where[0])
    ok(d, "reward_sharded")


PLAN_CONFIG = ModelConfig(
    vocab_size=512,
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    rope_theta=500.0,
)
PLAN_SFT = dict(micro_batch=4, bf16=True)
PLAN_PPO = dict(
    trainable_blocks=2,
    rollout_size=8,
    chunk_size=4,
    score_batch_size=4,  # as --chunk-size set it before it had a name of its own
    bottom_batch_size=4,
    batch_size=8,
    micro_batches=[4],
    prompt_len=200,
    new_tokens=24,
    bf16=True,
)


def plan_sft_step(model, d, n, **kw):
    from data.template import Rendered
    from train_sft import train_step

    return train_step(model, d, [Rendered([3] * 257, [3] * 257)] * n, pad_id=0, **kw)


def check_simulation_is_real(d, shard: int | None = None):
    """plan.py's steps on real tensors and gloo ranks (sharded over groups of `shard`: HSDP, see
    distributed.device_mesh): test_plan.py holds the same steps on fake tensors and fake ranks to
    these figures (rank 0's peaks, printed as JSON)."""
    import json

    import simulate

    from distributed import device_mesh

    mesh = device_mesh("cpu", d.world, shard)
    sft = simulate.measure_training(d, mesh, lambda: Transformer(PLAN_CONFIG), plan_sft_step, **PLAN_SFT)
    import train_ppo

    ppo = simulate.measure_ppo(d, mesh, PLAN_CONFIG, train_ppo.plan_parts(), **PLAN_PPO)
    if d.main:
        print(
            "measured "
            + json.dumps(
                {
                    "sft": sft.parts,
                    **{"/".join(map(str, k)) if isinstance(k, tuple) else k: m.parts for k, m in ppo.items()},
                }
            ),
            flush=True,
        )
    ok(d, "simulation_is_real")


def check_hsdp(d):
    """--shard-ranks 2 on 4 ranks (HSDP: two copies, each sharded over 2 ranks) trains as FSDP
    over all 4 does: an SFT step and AdamW in fp64, the same global batch, the same weights
    after it; each rank holds half of every weight, not a quarter."""
    from data.template import Rendered
    from train_sft import train_step
    from training import make_optimizer
    from distributed import device_mesh

    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    torch.manual_seed(0)
    whole = sharpen_(Transformer(CONFIG)).state_dict()
    gen = torch.Generator().manual_seed(3)
    items = [Rendered(t, t) for t in (torch.randint(3, 101, (6 + i,), generator=gen).tolist() for i in range(8))]
    after, losses = {}, {}
    for group in (None, 2):
        model = Transformer(CONFIG)
        model.load_state_dict(whole)
        shard(model, model.layers, bf16=False, mesh=device_mesh("cpu", d.world, group))
        if group:
            p = model.layers[0].mlp.up_proj.weight
            assert p.to_local().shape[0] == p.shape[0] // group, p.to_local().shape
        opt = make_optimizer(model, 1e-2, 0.0)
        losses[group] = train_step(model, d, items, pad_id=0, micro_batch=1, grad_clip=0.5, grad_sync="every")
        opt.step()
        after[group] = {k: v.full_tensor() for k, v in model.state_dict().items()}
    torch.testing.assert_close(losses[2], losses[None], **TOL)
    for k, v in after[None].items():
        torch.testing.assert_close(after[2][k], v, **TOL)
        assert not torch.equal(v, whole[k]) or "embed" in k, k  # it trained
    torch.set_default_dtype(default)
    ok(d, "hsdp")


def check_simulation_is_real_hsdp(d):
    check_simulation_is_real(d, shard=2)


if __name__ == "__main__":
    torch.set_num_threads(1)

    def main(_argv):
        d = init_distributed()
        try:
            for check in sys.argv[1:]:
                globals()[f"check_{check}"](d)
        finally:
            d.close()

    exit_trainer(main)  # the trainers' exit: see there why not through the interpreter's teardown
