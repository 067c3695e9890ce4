"""convert.py: Ziya-style delta merge and .bin -> safetensors, on tiny made-up checkpoints."""

import json
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, hf_config

from convert import apply_delta, convert
from model import ModelConfig, Transformer, hf_name


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
    model = Transformer.from_config(ModelConfig.from_hf(cfg.to_dict()), seed=seed)
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
    merged = Transformer.from_pretrained(tmp / "out", dtype=torch.float16)
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
    got = {hf_name(k): v for k, v in Transformer.from_pretrained(tmp / "st").state_dict().items()}
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
