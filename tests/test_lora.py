"""LoRA (issue 26 item 6): the adapted layer is base + (α/r)·B·A; only A and B learn; every
checkpoint is the merged plain LLaMA; 1 rank = 2 ranks; resume equals no interruption."""

import json

import pytest
import torch
from conftest import ROOT, micro_model
from safetensors.torch import load_file
from test_train_sft import in_process, interrupted_at_step, losses, run

from lora import LoRALinear, add_lora, lora_init, merge_lora
from model import ModelConfig, Transformer
from pretrained import load_reward_model, load_transformer, save_model

LORA = ["--lora-rank", "4", "--lora-alpha", "8", "--lora-targets", "q_proj", "v_proj", "down_proj"]
CFG = ModelConfig(
    vocab_size=101,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
)


def adapted(seed=0):
    """A small model in fp64 with LoRA on q_proj and down_proj, B random (not zero) so the update shows."""
    model = Transformer(CFG).to(torch.float64).init_weights(seed)
    add_lora(model, 4, 8.0, ["q_proj", "down_proj"])
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64))
    return model


@pytest.mark.numerics
def test_the_adapted_layer_is_the_base_plus_the_scaled_low_rank_update():
    layer = LoRALinear(6, 5, rank=2, alpha=3.0, dtype=torch.float64)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in (layer.weight, layer.lora_a, layer.lora_b):
            p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64))
    x = torch.randn(3, 6, generator=gen, dtype=torch.float64)
    by_hand = x @ (layer.weight + 1.5 * layer.lora_b @ layer.lora_a).T  # α/r = 3/2
    torch.testing.assert_close(layer(x), by_hand, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(
        layer.merged_weight(), layer.weight + 1.5 * layer.lora_b @ layer.lora_a, rtol=0, atol=1e-12
    )  # fp64, one formula
    fresh = LoRALinear(6, 5, rank=2, alpha=3.0)
    assert torch.count_nonzero(fresh.lora_b) == 0  # B starts at zero: the adapted model starts as the base


@pytest.mark.numerics
def test_gradients_reach_only_a_and_b():
    model = adapted()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {
        f"layers.{i}.{m}.{ab}"
        for i in range(2)
        for m in ("self_attn.q_proj", "mlp.down_proj")
        for ab in ("lora_a", "lora_b")
    }
    model(torch.randint(0, 101, (2, 7))).logsumexp(-1).sum().backward()
    for name, p in model.named_parameters():
        assert (p.grad is not None and p.grad.abs().sum() > 0) == (name in trainable), name
    init = lora_init(model, seed=0)
    assert set(init) == trainable and all(not t.any() for n, t in init.items() if n.endswith("lora_b"))


@pytest.mark.numerics
def test_the_merged_export_is_a_plain_llama_with_the_adapted_models_logits(tmp_path, tokenizer_file):
    model = adapted().eval()
    tokens = torch.randint(0, 101, (2, 9))
    save_model(model, tmp_path / "m", tokenizer=tokenizer_file)
    names = set(load_file(tmp_path / "m" / "model.safetensors"))
    assert not [n for n in names if "lora" in n] and "model.layers.0.self_attn.q_proj.weight" in names
    merged = load_transformer(tmp_path / "m", dtype=torch.float64).eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(tokens), model(tokens), rtol=1e-10, atol=1e-10)
    sd = merge_lora(model, model.state_dict())
    assert sd.keys() == Transformer(CFG).state_dict().keys()


def test_sft_with_lora_one_rank_equals_two_ranks_and_only_the_adapted_weights_move(tmp_path):
    run(tmp_path / "one", "--max-steps", "3", *LORA)
    run(tmp_path / "two", "--max-steps", "3", *LORA, nproc=2)
    a, b = losses(tmp_path / "one"), losses(tmp_path / "two")
    # fp32 trainer runs: the ranks sum the same per-item terms in another order (tests/TOLERANCES.md).
    assert len(a) == 3 and max(abs(x - y) for x, y in zip(a, b)) < 1e-4, (a, b)
    base = load_transformer(micro_model()).state_dict()  # what the runs start from
    final = load_file(tmp_path / "one" / "final" / "model.safetensors")
    for name, weight in final.items():
        ours = name.removeprefix("model.")
        moved = not torch.equal(weight, base[ours])
        assert moved == any(t in name for t in ("q_proj", "v_proj", "down_proj")), name
    card = json.loads((tmp_path / "one" / "final" / "config.json").read_text())
    assert card["architectures"] == ["LlamaForCausalLM"]  # an ordinary LLaMA


def test_sft_with_lora_resumes_exactly(tmp_path, monkeypatch):
    torch.set_num_threads(1)
    args = ["--max-steps", "4", "--save-every", "2", *LORA]
    in_process(monkeypatch, tmp_path / "whole", *args)
    with interrupted_at_step(monkeypatch, 3), pytest.raises(KeyboardInterrupt):
        in_process(monkeypatch, tmp_path / "resumed", *args)
    with pytest.raises(SystemExit, match=r"other settings or data \(lora: "):  # LoRA's settings define the run
        in_process(monkeypatch, tmp_path / "resumed", "--max-steps", "4", "--save-every", "2", *LORA[:2], "--resume")
    in_process(monkeypatch, tmp_path / "resumed", *args, "--resume")
    assert losses(tmp_path / "resumed") == losses(tmp_path / "whole")
    a, b = (load_file(tmp_path / d / "final" / "model.safetensors") for d in ("whole", "resumed"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_the_dry_run_simulates_a_lora_run(capsys):
    """Issue 26: what a LoRA run needs, from this code's step on fake tensors (the memory model
    knows no adapters, so the dry run gives only the simulation)."""
    import train_sft

    train_sft.main(
        [
            "--model",
            "tiny",
            "--dry-run",
            "--simulate",
            "--world-size",
            "2",
            "--max-len",
            "64",
            "--simulate-micro-batches",
            "1",
            *LORA,
        ]
    )
    out = capsys.readouterr().out
    assert "LoRA rank 4 (alpha 8) on q_proj v_proj down_proj" in out
    assert "simulated: train_sft.train_step and AdamW on fake tensors over 2 fake rank(s)" in out
    rows = [line.split() for line in out.splitlines() if line.strip().startswith("1 ")]
    assert [r[1] for r in rows] == ["off", "on"] and all(float(r[-2]) > 0 for r in rows)


@pytest.mark.numerics
def test_a_reward_model_with_lora_trains_its_adapters_and_head_and_exports_plain(tmp_path, monkeypatch):
    import train_rm

    torch.set_num_threads(1)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    train_rm.main(
        [
            "--model",
            str(micro_model()),
            "--data",
            str(ROOT / "data" / "preference" / "preference_pairs.jsonl"),
            "--out",
            str(tmp_path),
            "--batch-size",
            "4",
            "--micro-batch-size",
            "2",
            "--lr",
            "1e-3",
            "--max-steps",
            "2",
            *LORA,
        ]
    )
    rm = load_reward_model(tmp_path / "final")
    assert not any(isinstance(m, LoRALinear) for m in rm.modules())  # merged: a plain reward model
    assert rm.score_head.weight.abs().sum() > 0  # the head, zero at the start, was trained
    base = load_transformer(micro_model()).state_dict()
    for name, weight in rm.trunk.state_dict().items():
        assert (not torch.equal(weight, base[name])) == any(t in name for t in ("q_proj", "v_proj", "down_proj")), name


def test_under_bf16_the_frozen_base_is_stored_in_bf16_and_every_step_is_the_same(tmp_path, monkeypatch):
    """Issue 26: LoRA's frozen base in bf16 on the GPU. bf16 mixed precision forced on the CPU
    (the GPU's code path: FSDP2 gathers in bf16, reduces in fp32): with the frozen weights stored
    in bf16 the losses are those of storing them in fp32, to the bit, since FSDP casts each
    weight to bf16 before it computes either way; the adapters keep fp32 master weights."""
    import train_sft
    import distributed

    torch.set_num_threads(1)
    monkeypatch.setattr(train_sft, "mixed_precision", lambda d, args: True)
    stored = {}

    def keeping(frozen_bf16):
        def shard_and_load(model, full, d, *, bf16, **kw):
            model = distributed.shard_and_load(model, full, d, bf16=bf16, frozen_bf16=frozen_bf16 and kw["frozen_bf16"])
            stored[frozen_bf16] = {n: p.dtype for n, p in model.named_parameters()}
            return model

        return shard_and_load

    for frozen_bf16 in (True, False):
        monkeypatch.setattr(train_sft, "shard_and_load", keeping(frozen_bf16))
        # exported in bf16 (micro_model's own dtype is fp32) against the fp32 export of fp32 storage
        in_process(
            monkeypatch,
            tmp_path / str(frozen_bf16),
            "--max-steps",
            "3",
            *LORA,
            *(["--save-dtype", "bfloat16"] if frozen_bf16 else []),
        )
    assert losses(tmp_path / "True") == losses(tmp_path / "False")
    assert all((dtype == torch.float32) == ("lora_" in n) for n, dtype in stored[True].items()), stored[True]
    assert set(stored[False].values()) == {torch.float32}
    a, b = (load_file(tmp_path / str(f) / "final" / "model.safetensors") for f in (True, False))
    base = load_transformer(micro_model()).state_dict()
    for name in a:  # the same export but for the base's rounding to bf16
        assert a[name].dtype == torch.bfloat16 and b[name].dtype == torch.float32, name
        if not any(t in name for t in ("q_proj", "v_proj", "down_proj")):
            assert torch.equal(a[name], b[name].to(torch.bfloat16)), name  # a frozen weight: rounded once
        else:  # bf16(bf16(W) + (α/r)·B·A): two roundings, each within half a bf16 ulp (2^-8 relative)
            w = base[name.removeprefix("model.")]
            assert ((a[name].float() - b[name]).abs() <= 2**-8 * (w.abs() + b[name].abs())).all(), name
