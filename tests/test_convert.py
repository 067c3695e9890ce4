"""convert.py: Ziya-style delta merge and .bin -> safetensors, on tiny made-up checkpoints."""

import json
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, hf_config

from convert import apply_delta, convert
from model import Transformer
from pretrained import config_from_hf, load_reward_model, load_transformer, read_config
from pretrained import hf_name


def write_bin_dir(directory, tensors, config, shards=2, tokenizer=None):
    """An old-style HF directory: pytorch_model-0000i-of-0000n.bin + index, with inv_freq buffers."""
    directory.mkdir(parents=True)
    names = sorted(tensors)
    weight_map = {}
    for i in range(shards):
        part = {n: tensors[n] for n in names[i::shards]}
        fname = f"pytorch_model-{i + 1:05d}-of-{shards:05d}.bin"
        part[f"model.layers.{i % 2}.self_attn.rotary_emb.inv_freq"] = torch.ones(8)
        torch.save(part, directory / fname)
        weight_map.update(dict.fromkeys(part, fname))
    (directory / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (directory / "config.json").write_text(json.dumps(config))
    if tokenizer:
        (directory / "tokenizer.model").write_bytes(tokenizer.read_bytes())


def random_state(vocab, seed):
    cfg = hf_config(vocab_size=vocab)
    model = Transformer.from_config(config_from_hf(cfg.to_dict()), seed=seed)
    return {hf_name(k): v.to(torch.float16) for k, v in model.state_dict().items()}, cfg.to_dict()


@pytest.fixture
def base_and_delta(tmp_path, tokenizer_file):
    base, base_cfg = random_state(vocab=401, seed=1)  # "LLaMA": its own vocabulary
    delta, delta_cfg = random_state(vocab=420, seed=2)  # "Ziya": a larger one, for its 400-piece tokenizer
    write_bin_dir(tmp_path / "base", base, base_cfg, shards=3)
    write_bin_dir(tmp_path / "delta", delta, delta_cfg, shards=2, tokenizer=tokenizer_file)
    return tmp_path, base, delta


def test_delta_merge(base_and_delta):
    tmp, base, delta = base_and_delta
    apply_delta(tmp / "base", tmp / "delta", tmp / "out", max_shard_bytes=40_000)
    merged = load_transformer(tmp / "out", dtype=torch.float16)
    assert merged.config.vocab_size == 420
    got = {hf_name(k): v for k, v in merged.state_dict().items()}
    for name in delta:
        if name in ("model.embed_tokens.weight", "lm_head.weight"):
            expected = delta[name]  # taken from the delta as it is
        else:
            expected = (base[name].float() + delta[name].float()).half()
        assert torch.equal(got[name], expected), name
    assert (tmp / "out" / "tokenizer.model").read_bytes() == (tmp / "delta" / "tokenizer.model").read_bytes()
    assert (tmp / "out" / "model.safetensors.index.json").is_file()


def test_convert_bin_to_safetensors_via_cli(base_and_delta):
    tmp, base, _ = base_and_delta
    subprocess.run(
        [
            sys.executable,
            str(ROOT / "convert.py"),
            "--src",
            str(tmp / "base"),
            "--out",
            str(tmp / "st"),
            "--dtype",
            "float32",
        ],
        check=True,
        capture_output=True,
    )
    got = {hf_name(k): v for k, v in load_transformer(tmp / "st").state_dict().items()}
    assert got.keys() == base.keys()
    assert all(torch.equal(got[k], base[k].float()) for k in base)
    card = (tmp / "st" / "README.md").read_text(encoding="utf-8")  # issue 26: every checkpoint has a model card
    assert "tags: [medical, huatuogpt, llama, base]" in card and f"converted from {tmp / 'base'}" in card
    assert "Here: this checkpoint carries no tokenizer." in card  # as its source
    # Converting again into the same --out is refused unless --overwrite (issue 21: one rule).
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "convert.py"),
            "--src",
            str(tmp / "base"),
            "--out",
            str(tmp / "st"),
            "--dtype",
            "bfloat16",
        ],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2 and proc.stderr.strip() == (
        f"error: {tmp} holds an earlier model (st): add --overwrite to replace it, or choose another --out"
    )
    assert json.loads((tmp / "st" / "config.json").read_text())["torch_dtype"] == "float32"  # not replaced


def test_delta_errors(base_and_delta):
    tmp, base, delta = base_and_delta
    # A tensor whose shape disagrees between base and delta (not the embedding or the head).
    index = json.loads((tmp / "delta" / "pytorch_model.bin.index.json").read_text())
    name = "model.layers.0.mlp.up_proj.weight"
    file = tmp / "delta" / index["weight_map"][name]
    part = torch.load(file, weights_only=True)
    part[name] = torch.zeros(3, 3, dtype=torch.float16)
    torch.save(part, file)
    with pytest.raises(ValueError, match=f"{name}: base .* has shape \\(96, 64\\), delta .* has \\(3, 3\\)"):
        apply_delta(tmp / "base", tmp / "delta", tmp / "out")
    assert not (tmp / "out").exists()
    # A base missing a shard.
    (tmp / "base" / "pytorch_model-00002-of-00003.bin").unlink()
    with pytest.raises(FileNotFoundError, match="pytorch_model-00002-of-00003.bin"):
        apply_delta(tmp / "base", tmp / "delta", tmp / "out")


def test_bin_files_are_never_unpickled_as_code(tmp_path):
    class Payload:
        def __reduce__(self):
            return (print, ("executed!",))

    d = tmp_path / "evil"
    d.mkdir()
    torch.save({"model.norm.weight": torch.ones(4), "x": Payload()}, d / "pytorch_model.bin")
    (d / "config.json").write_text(json.dumps(hf_config().to_dict()))
    with pytest.raises(ValueError, match="pytorch_model.bin: cannot read as a PyTorch weights file"):
        convert(d, tmp_path / "out")


# -- HuatuoGPT-7B: Baichuan-7B's layout (issue 46) ---------------------------------------------------------

BAICHUAN = dict(
    architectures=["BaiChuanForCausalLM"],
    auto_map={"AutoConfig": "configuration_baichuan.BaiChuanConfig"},
    model_type="baichuan",
    vocab_size=120,
    hidden_size=32,
    intermediate_size=80,
    num_hidden_layers=2,
    num_attention_heads=4,
    hidden_act="silu",
    max_position_embeddings=128,
    rms_norm_eps=1e-6,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
    tie_word_embeddings=False,
    torch_dtype="float32",
)


def baichuan_state(cfg: dict, seed: int = 0) -> dict:
    """Random weights in Baichuan-7B's published names and shapes (fp32, as HuatuoGPT-7B's .bin
    shards): W_pack (3H, H), the inv_freq buffers its RotaryEmbedding registers (base 10000)."""
    g = torch.Generator().manual_seed(seed)
    H, F, V = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    dim = H // cfg["num_attention_heads"]
    state = {
        "model.embed_tokens.weight": torch.randn(V, H, generator=g),
        "lm_head.weight": torch.randn(V, H, generator=g) * 0.3,
    }
    state["model.norm.weight"] = torch.rand(H, generator=g) + 0.5
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        state[p + "self_attn.W_pack.weight"] = torch.randn(3 * H, H, generator=g) * 0.3
        state[p + "self_attn.o_proj.weight"] = torch.randn(H, H, generator=g) * 0.2
        state[p + "self_attn.rotary_emb.inv_freq"] = 1.0 / (10000 ** (torch.arange(0, dim, 2).float() / dim))
        for name, shape in (("gate_proj", (F, H)), ("up_proj", (F, H)), ("down_proj", (H, F))):
            state[p + f"mlp.{name}.weight"] = torch.randn(*shape, generator=g) * 0.2
        state[p + "input_layernorm.weight"] = torch.rand(H, generator=g) + 0.5
        state[p + "post_attention_layernorm.weight"] = torch.rand(H, generator=g) + 0.5
    return state


def baichuan_forward(state: dict, cfg: dict, ids: torch.Tensor) -> torch.Tensor:
    """Logits of Baichuan-7B's forward, transcribed from its published modeling code
    (baichuan-inc/Baichuan-7B models/modeling_baichuan.py, commit 0ae400d, the inference
    branch): RMSNorm (the variance from an fp32 copy, the input itself kept in its dtype, eps
    from the config), W_pack's output unflattened as (3,
    H) for q, k, v, rotate-half RoPE from the stored inv_freq (angles in fp32, as it computes
    them), softmax(q k^T / sqrt(d) + causal
    mask) v, o_proj, a SiLU-gated MLP, the final norm and lm_head. Independent of model.py."""
    s = {k: v.double() for k, v in state.items()}
    H, heads = cfg["hidden_size"], cfg["num_attention_heads"]
    d, T = H // heads, ids.shape[1]

    def rms(x, w):
        variance = x.float().pow(2).mean(-1, keepdim=True)
        return w * (x * torch.rsqrt(variance + cfg["rms_norm_eps"]))

    def rotate_half(x):
        return torch.cat((-x[..., d // 2 :], x[..., : d // 2]), dim=-1)

    x = s["model.embed_tokens.weight"][ids]
    mask = torch.full((T, T), float("-inf")).triu(1).double()
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        h = rms(x, s[p + "input_layernorm.weight"])
        proj = (h @ s[p + "self_attn.W_pack.weight"].T).unflatten(-1, (3, H))
        q, k, v = (proj[..., j, :].view(1, T, heads, d).transpose(1, 2) for j in range(3))
        # As its RotaryEmbedding: angles from the stored fp32 buffer in fp32, cos and sin cast to x's dtype.
        freqs = torch.einsum(
            "i,j->ij", torch.arange(T, dtype=torch.float32), state[p + "self_attn.rotary_emb.inv_freq"]
        )
        emb = torch.cat((freqs, freqs), -1)
        cos, sin = emb.cos().double(), emb.sin().double()
        q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        att = ((q @ k.transpose(2, 3)) / d**0.5 + mask).softmax(-1)
        o = (att @ v).transpose(1, 2).reshape(1, T, H) @ s[p + "self_attn.o_proj.weight"].T
        x = x + o
        h = rms(x, s[p + "post_attention_layernorm.weight"])
        gate, up = h @ s[p + "mlp.gate_proj.weight"].T, h @ s[p + "mlp.up_proj.weight"].T
        x = x + (torch.nn.functional.silu(gate) * up) @ s[p + "mlp.down_proj.weight"].T
    return rms(x, s["model.norm.weight"]) @ s["lm_head.weight"].T


def test_huatuogpt_7b_in_baichuans_layout_converts_and_runs_as_baichuans_code(tmp_path):
    """Issue 46 item 1: a tiny checkpoint in HuatuoGPT-7B's released layout (fp32 .bin shards,
    W_pack, inv_freq, a Baichuan config with custom code) converts; our logits equal the
    transcribed Baichuan forward in fp64, and greedy generation equals it token for token."""
    from generate import generate

    state = baichuan_state(BAICHUAN)
    src = tmp_path / "huatuogpt-7b"
    write_bin_dir(src, {k: v for k, v in state.items() if "inv_freq" not in k}, BAICHUAN, shards=2)
    for f in src.glob("*.bin"):  # this layout's real buffers (write_bin_dir's are stand-ins)
        part = {k: (state[k] if k.endswith("inv_freq") else v) for k, v in torch.load(f).items()}
        torch.save(part, f)
    assert (
        subprocess.run(
            [sys.executable, str(ROOT / "convert.py"), "--src", str(src), "--out", str(tmp_path / "out")],
            capture_output=True,
            text=True,
            cwd=ROOT,
        ).returncode
        == 0
    )
    hf = json.loads((tmp_path / "out" / "config.json").read_text())
    assert hf["model_type"] == "llama" and "auto_map" not in hf and hf["rope_theta"] == 10000.0
    ours = load_transformer(tmp_path / "out", dtype=torch.float64).eval()
    ids = torch.tensor([[1, 17, 54, 3, 99, 23, 8, 71, 40]])
    # The bound: in fp64 the two differ by fp32 roundings only. model.py's RMSNorm rounds its
    # input to fp32 (as transformers' LLaMA does), Baichuan's keeps it and rounds only the
    # variance: 2^-24 relative on each of the 5 norms' outputs, below 1e-5 on these logits (of
    # order 3, measured 1.3e-6); q and k swapped in the split, or RoPE pairing neighbours, moves
    # them by order 1 (checked below).
    reference = baichuan_forward(state, BAICHUAN, ids)
    with torch.no_grad():
        assert (ours(ids) - reference).abs().max() < 1e-5
    swapped = dict(state)
    for i in range(BAICHUAN["num_hidden_layers"]):
        w = state[f"model.layers.{i}.self_attn.W_pack.weight"]
        swapped[f"model.layers.{i}.self_attn.W_pack.weight"] = torch.cat([w[32:64], w[:32], w[64:]])
    assert (baichuan_forward(swapped, BAICHUAN, ids) - reference).abs().max() > 0.1
    with torch.no_grad():
        got = generate(ours, [ids[0].tolist()], max_new_tokens=12, eos_id=None, temperature=0).tokens[0]
    expected, seq = [], ids
    for _ in range(12):  # the reference decodes by recomputing the whole sequence each step
        nxt = int(baichuan_forward(state, BAICHUAN, seq)[0, -1].argmax())
        expected.append(nxt)
        seq = torch.cat([seq, torch.tensor([[nxt]])], 1)
    assert got == expected


def baichuan_dir(directory, cfg, state):
    """write_bin_dir with the layout's own buffers (its stand-ins replaced by the real inv_freq)."""
    write_bin_dir(directory, {k: v for k, v in state.items() if "inv_freq" not in k}, cfg, shards=2)
    for f in directory.glob("*.bin"):
        torch.save({k: (state[k] if k.endswith("inv_freq") else v) for k, v in torch.load(f).items()}, f)


def test_huatuogpt_7b_s_tokenizer_keeps_its_no_bos_setting_through_conversion(tmp_path, tokenizer_file):
    """Issue 46 item 1: Baichuan-7B's tokenizer config adds no <s>; the converted checkpoint's
    tokenizer files say so, and every prompt rendered from it starts without one (render, as
    the trainers, chat, the server and the evaluation call it)."""
    from data.template import SYSTEM, render
    from tokenizer import Tokenizer

    cfg = dict(BAICHUAN, vocab_size=420)  # room for the tests' 400-piece tokenizer
    src = tmp_path / "huatuogpt-7b"
    baichuan_dir(src, cfg, baichuan_state(cfg))
    (src / "tokenizer.model").write_bytes(tokenizer_file.read_bytes())
    (src / "tokenizer_config.json").write_text(
        json.dumps({"add_bos_token": False, "tokenizer_class": "BaiChuanTokenizer"})
    )
    convert(src, tmp_path / "out")
    tok = Tokenizer(tmp_path / "out" / "tokenizer.model")
    assert tok.add_bos is False
    ids = render(tok, [{"role": "user", "content": "头痛"}]).ids
    assert ids[: len(tok.encode(SYSTEM))] == tok.encode(SYSTEM)  # the system text first, no <s>
    assert json.loads((tmp_path / "out" / "tokenizer_config.json").read_text())["add_bos_token"] is False


def test_baichuan2_s_norm_head_is_normalised_at_conversion(tmp_path):
    """Issue 46 item 1: Baichuan2-7B (HuatuoGPT-II-7B's base) computes its logits with each LM
    head row L2-normalised (NormHead, Baichuan2-7B-Chat modeling_baichuan.py at 84603cd; vLLM
    tells the layouts apart by the vocabulary, 125,696). Converted, our logits equal the
    transcribed forward with that head; Baichuan-7B's head (64,000) is left as it is."""
    cfg = dict(BAICHUAN, vocab_size=125696, hidden_size=16, intermediate_size=24, num_attention_heads=2)
    state = baichuan_state(cfg)
    baichuan_dir(tmp_path / "b2", cfg, state)
    convert(tmp_path / "b2", tmp_path / "out")
    ours = load_transformer(tmp_path / "out", dtype=torch.float64).eval()
    head = ours.lm_head.weight
    assert torch.allclose(head.norm(dim=-1), torch.ones(125696, dtype=torch.float64), atol=1e-6)
    ids = torch.tensor([[1, 17, 54, 3, 99, 23]])
    norm_head = dict(state, **{"lm_head.weight": torch.nn.functional.normalize(state["lm_head.weight"])})
    with torch.no_grad():
        assert (ours(ids) - baichuan_forward(norm_head, cfg, ids)).abs().max() < 1e-5  # the bound of the 7B test
        assert (ours(ids) - baichuan_forward(state, cfg, ids)).abs().max() > 0.1  # the raw head is another model
    assert "NormHead" in (tmp_path / "out" / "README.md").read_text()


def test_what_model_py_cannot_run_is_refused_in_one_line_before_any_tensor_is_read(tmp_path, monkeypatch):
    """Issue 46 item 1: from_hf ignored model_type, so Baichuan-13B's config (ALiBi, no RoPE)
    would load and run silently wrong. A Baichuan-13B config, an unknown model_type, a RoPE
    scaling: one line each, and no tensor read."""
    import convert

    read = []
    monkeypatch.setattr(convert.CheckpointFiles, "load", lambda self, f: read.append(f))
    state = baichuan_state(BAICHUAN)
    thirteen = {k: v for k, v in BAICHUAN.items() if k != "max_position_embeddings"} | {"model_max_length": 4096}
    cases = [
        (thirteen, "Baichuan-13B's layout, whose attention uses ALiBi"),
        (dict(BAICHUAN, model_type="mistral"), "model_type 'mistral' is not LLaMA's"),
        (dict(BAICHUAN, model_type="llama", rope_scaling={"type": "linear", "factor": 2.0}), "RoPE scaling"),
    ]
    for i, (cfg, says) in enumerate(cases):
        src = tmp_path / f"m{i}"
        write_bin_dir(src, state, cfg, shards=1)
        with pytest.raises(ValueError, match=says):
            convert.convert(src, tmp_path / f"out{i}")
        with pytest.raises(ValueError, match=says):
            read_config(src / "config.json")
    assert read == []
    with pytest.raises(ValueError, match=r"convert it first, `python convert.py --src"):
        config_from_hf(BAICHUAN)  # the 7B layout itself: not opened unconverted


# -- HuatuoGPT-reward-model-7B: Ziya's LlamaRewardModel layout (issue 46 item 3) -------------------------


def ziya_reward_dir(directory, tokenizer_file, bias: float | None = 0.75, seed: int = 0):
    """A tiny checkpoint in the released reward model's layout: a `model.` LLaMA trunk (LLaMA's
    config, 400 pieces + 1 added token), no LM head, value_head.weight (1, H) and its bias, .bin
    shards with inv_freq buffers; returns the trunk (transformers' LlamaModel, fp64) and head."""
    from transformers import LlamaModel

    cfg = hf_config(vocab_size=401, architectures=["LlamaRewardModel"])
    torch.manual_seed(seed)
    trunk = LlamaModel(cfg).double().eval()
    for p in trunk.parameters():  # sharper than the 0.02 init, so that positions and rows matter
        p.data.normal_(0, 0.3) if p.dim() > 1 else p.data.uniform_(0.5, 1.5)
        p.data = p.data.float().double()  # the values the fp32 shards hold
    head = torch.nn.Linear(cfg.hidden_size, 1, bias=bias is not None).double()
    head.weight.data = head.weight.data.float().double()
    if bias is not None:
        head.bias.data.fill_(bias)
    state = {f"model.{k}": v.float() for k, v in trunk.state_dict().items()}
    state.update({f"value_head.{k}": v.float() for k, v in head.state_dict().items()})
    write_bin_dir(directory, state, cfg.to_dict(), shards=2, tokenizer=tokenizer_file)
    return trunk, head


def official_reward(trunk, head, tokens, mask):
    """LlamaRewardModel.forward as the released model's code runs it (Ziya's, as the issue
    gives it): the trunk's last hidden state, the value head (with its bias) on every position,
    read at attention_mask.cumsum(1).argmax(1), the last real token."""
    values = head(trunk(input_ids=tokens, attention_mask=mask).last_hidden_state.double()).squeeze(-1)
    return values.gather(1, mask.cumsum(1).argmax(1, keepdim=True)).squeeze(1)


CONVERSATIONS = [
    ([{"role": "user", "content": "头痛三天了怎么办？"}], "多休息，注意饮水。"),
    (
        [
            {"role": "user", "content": "孩子发烧"},
            {"role": "assistant", "content": "多少度？"},
            {"role": "user", "content": "38.5度"},
        ],
        "先物理降温。",
    ),
]


@pytest.mark.numerics
def test_the_released_reward_model_converts_with_its_bias_and_scores_as_its_own_code(tmp_path, tokenizer_file):
    """Issue 46 item 3: convert.py stopped at value_head.bias. Converted, the scores equal the
    official forward (trunk, last real token of the text with its eos, value head with bias) in
    fp64; `train_rm.py score` reads the converted model in its own format and prints the same;
    transformers' LlamaForSequenceClassification opens the export, names score.bias as the
    key it has no place for, and scores exactly that constant lower."""
    from transformers import LlamaForSequenceClassification

    from data.template import reward_ids
    from tokenizer import Tokenizer

    trunk, head = ziya_reward_dir(tmp_path / "released", tokenizer_file)
    convert(tmp_path / "released", tmp_path / "rm")
    rm = load_reward_model(tmp_path / "rm", dtype=torch.float64).eval()
    assert rm.prompt_format == "ziya-rm" and rm.score_head.bias.item() == 0.75
    tok = Tokenizer(tmp_path / "rm" / "tokenizer.model")
    seqs = [reward_ids(tok, m, r, "ziya-rm", max_len=256) for m, r in CONVERSATIONS]
    # the format by hand: Ziya's usage, <s> (its tokenizer adds one), the text encoded whole, eos
    assert seqs[0] == [1] + tok.sp.encode("Human:头痛三天了怎么办？\n\nAssistant:多休息，注意饮水。") + [2]
    assert seqs[1] == [1] + tok.sp.encode(
        "Human:孩子发烧\n\nAssistant:多少度？\n\nHuman:38.5度\n\nAssistant:先物理降温。"
    ) + [2]
    width = max(map(len, seqs))
    tokens = torch.tensor([s + [0] * (width - len(s)) for s in seqs])
    mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs])
    with torch.no_grad():
        expected = official_reward(trunk, head, tokens, mask)
        torch.testing.assert_close(rm(tokens, mask), expected, rtol=1e-12, atol=1e-12)
        assert (
            expected - official_reward(trunk, torch.nn.Linear(64, 1).double().requires_grad_(False), tokens, mask)
        ).abs().max() > 0.1
    data = tmp_path / "pairs.jsonl"
    data.write_text(
        "".join(
            json.dumps(
                {"id": f"c{i}", "source": "test", "messages": m + [{"role": "assistant", "content": r}]},
                ensure_ascii=False,
            )
            + "\n"
            for i, (m, r) in enumerate(CONVERSATIONS)
        ),
        encoding="utf-8",
    )
    cmd = [
        sys.executable,
        str(ROOT / "train_rm.py"),
        "score",
        "--model",
        str(tmp_path / "rm"),
        "--data",
        str(data),
        "--dtype",
        "float32",
    ]
    run = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    assert run.returncode == 0, run.stderr
    printed = [json.loads(line)["reward"] for line in run.stdout.splitlines()]
    assert printed == pytest.approx(expected.tolist(), abs=1e-4)  # fp32, rounded to 6 places
    theirs, info = LlamaForSequenceClassification.from_pretrained(tmp_path / "rm", output_loading_info=True)
    assert "score.bias" in info["unexpected_keys"]
    with torch.no_grad():
        torch.testing.assert_close(
            theirs.double()(tokens, attention_mask=mask).logits[:, 0], expected - 0.75, rtol=1e-12, atol=1e-12
        )
    assert "0.75" in (tmp_path / "rm" / "README.md").read_text()
    assert json.loads((tmp_path / "rm" / "reward_config.json").read_text())["score_bias"] == 0.75
