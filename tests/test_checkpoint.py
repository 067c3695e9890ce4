"""pretrained.save_model / load_transformer: HF layout both ways, bit-exact, atomic, clear errors."""

import json

import pytest
import torch
from conftest import make_pair
from safetensors.torch import load_file, save_file

import checkpoint
from pretrained import load_transformer, save_model


def state_equal(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k


@pytest.mark.parametrize("max_shard_bytes", [2**40, 60_000])
def test_round_trip_is_bit_exact(pair, tmp_path, tokenizer_file, max_shard_bytes):
    ours, _ = pair
    save_model(ours, tmp_path / "ckpt", tokenizer=tokenizer_file, max_shard_bytes=max_shard_bytes)
    files = sorted(p.name for p in (tmp_path / "ckpt").iterdir())
    if max_shard_bytes < 2**40:
        assert "model.safetensors.index.json" in files and "model-00002-of-" in " ".join(files)
    else:
        assert "model.safetensors" in files
    assert {"config.json", "tokenizer.model", "tokenizer_config.json"} <= set(files)
    state_equal(load_transformer(tmp_path / "ckpt"), ours)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "temporary directory left behind"


def test_tied_round_trip(tmp_path):
    ours, _ = make_pair(tie_word_embeddings=True)
    save_model(ours, tmp_path / "t")
    assert "lm_head.weight" not in load_file(tmp_path / "t" / "model.safetensors")
    loaded = load_transformer(tmp_path / "t")
    assert loaded.lm_head.weight is loaded.embed_tokens.weight
    state_equal(loaded, ours)


@pytest.mark.numerics
def test_transformers_opens_our_checkpoint(pair, tmp_path, tokenizer_file):
    from transformers import AutoTokenizer, LlamaForCausalLM

    ours, _ = pair
    save_model(ours, tmp_path / "ckpt", tokenizer=tokenizer_file, max_shard_bytes=60_000)
    hf = LlamaForCausalLM.from_pretrained(tmp_path / "ckpt").eval()
    tokens = torch.randint(0, 101, (2, 30))
    with torch.no_grad():  # fp64 (the fp32 weights widen exactly): the same logits, rounding aside
        torch.testing.assert_close(hf.double()(tokens).logits, ours.double()(tokens), rtol=1e-12, atol=1e-12)
    from tokenizer import Tokenizer

    hf_tok = AutoTokenizer.from_pretrained(tmp_path / "ckpt")
    text = "孩子发烧38.5度，可以先物理降温。"
    assert hf_tok(text)["input_ids"] == Tokenizer(tokenizer_file).encode(text, bos=True)


@pytest.mark.numerics
def test_we_open_transformers_checkpoint(tmp_path):
    ours, hf = make_pair(num_key_value_heads=2)
    hf.save_pretrained(tmp_path / "hf", max_shard_size="50KB")
    assert (tmp_path / "hf" / "model.safetensors.index.json").is_file()
    loaded = load_transformer(tmp_path / "hf", dtype=torch.bfloat16)
    assert loaded.embed_tokens.weight.dtype == torch.bfloat16
    for k, v in ours.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v.to(torch.bfloat16)), k


def test_save_is_atomic(pair, tmp_path, monkeypatch):
    ours, _ = pair
    save_model(ours, tmp_path / "best")
    before = load_file(tmp_path / "best" / "model.safetensors")
    real_save = checkpoint._save_shard

    def crash_on_second(directory, i, shard):
        if i == 2:
            raise KeyboardInterrupt("simulated crash while writing")
        real_save(directory, i, shard)

    monkeypatch.setattr(checkpoint, "_save_shard", crash_on_second)
    with torch.no_grad():
        ours.norm.weight.add_(1.0)
    with pytest.raises(KeyboardInterrupt):
        save_model(ours, tmp_path / "best", max_shard_bytes=60_000)
    after = load_file(tmp_path / "best" / "model.safetensors")
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best"]


@pytest.fixture
def sharded(pair, tmp_path):
    ours, _ = pair
    save_model(ours, tmp_path / "m", max_shard_bytes=60_000)
    return tmp_path / "m"


def index_of(d):
    return json.loads((d / "model.safetensors.index.json").read_text())


def test_error_missing_shard(sharded):
    victim = sorted(sharded.glob("model-*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(FileNotFoundError, match=f"shard {victim.name} is missing"):
        load_transformer(sharded)


def test_error_missing_tensor(sharded):
    idx = index_of(sharded)
    file = sharded / idx["weight_map"]["model.layers.1.mlp.up_proj.weight"]
    tensors = load_file(file)
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, file)
    del idx["weight_map"]["model.layers.1.mlp.up_proj.weight"]
    (sharded / "model.safetensors.index.json").write_text(json.dumps(idx))
    with pytest.raises(ValueError, match=r"lacks tensors \['model.layers.1.mlp.up_proj.weight'\]"):
        load_transformer(sharded)


def test_error_index_names_a_tensor_the_shard_lacks(sharded):
    idx = index_of(sharded)
    file = sharded / idx["weight_map"]["model.norm.weight"]
    tensors = load_file(file)
    del tensors["model.norm.weight"]
    save_file(tensors, file)
    with pytest.raises(ValueError, match=f"{file.name}.*model.norm.weight"):
        load_transformer(sharded)


def test_a_checkpoint_with_a_stale_copy_of_a_tensor_in_another_shard_is_refused_naming_both(sharded):
    """Issue 44 item 3: with a second file also holding a (stale) copy of a tensor the index
    assigns elsewhere, whichever file was read last won, silently (transformers 5.25 reads the
    checkpoint below with the stale copy, so it is no oracle here). Now it is refused, naming
    both files, before any tensor is read; a copy the index does not list at all, likewise."""
    idx = index_of(sharded)
    files = sorted(set(idx["weight_map"].values()))
    name = next(n for n, f in idx["weight_map"].items() if f == files[0] and n.startswith("model.layers."))
    tensors = load_file(sharded / files[-1])
    stale = dict(tensors, **{name: torch.full_like(load_file(sharded / files[0])[name], 7.0)})
    save_file(stale, sharded / files[-1])  # read after the index's file: the stale copy won
    with pytest.raises(
        ValueError, match=rf"{files[-1]}: holds a copy of '{name}', but the index assigns it to {files[0]}"
    ):
        load_transformer(sharded)
    save_file(dict(tensors, extra=torch.zeros(3)), sharded / files[-1])
    with pytest.raises(ValueError, match=rf"{files[-1]}: holds a copy of 'extra', but the index does not list it"):
        load_transformer(sharded)


def test_error_unexpected_tensor(pair, tmp_path):
    ours, _ = pair
    save_model(ours, tmp_path / "m")
    f = tmp_path / "m" / "model.safetensors"
    tensors = load_file(f)
    tensors["model.layers.2.mlp.up_proj.weight"] = torch.zeros(96, 64)
    save_file(tensors, f)
    with pytest.raises(ValueError, match="unexpected tensor 'model.layers.2.mlp.up_proj.weight'"):
        load_transformer(tmp_path / "m")


def test_error_shape_disagrees_with_config(pair, tmp_path):
    ours, _ = pair
    save_model(ours, tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    cfg["intermediate_size"] = 128
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(
        ValueError,
        match=r"model.layers.0.mlp.\w+_proj.weight.* has shape \((96, 64|64, 96)\), but config.json implies \((128, 64|64, 128)\)",
    ):
        load_transformer(tmp_path / "m")


@pytest.mark.parametrize("damage", ["truncate", "garbage_header"])
def test_error_corrupt_file(pair, tmp_path, damage):
    ours, _ = pair
    save_model(ours, tmp_path / "m")
    f = tmp_path / "m" / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2] if damage == "truncate" else b"\xff" * 8 + data[8:])
    with pytest.raises(ValueError, match="model.safetensors: cannot read safetensors file"):
        load_transformer(tmp_path / "m")


def test_error_no_config_or_weights(pair, tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_transformer(tmp_path)
    ours, _ = pair
    save_model(ours, tmp_path / "m")
    (tmp_path / "m" / "model.safetensors").unlink()
    torch.save({}, tmp_path / "m" / "pytorch_model.bin")
    with pytest.raises(FileNotFoundError, match="convert.py"):
        load_transformer(tmp_path / "m")
    (tmp_path / "m" / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="config.json: not valid JSON"):
        load_transformer(tmp_path / "m")


def test_checkpoints_respect_the_umask(pair, tmp_path):
    import os
    import stat

    ours, _ = pair
    old = os.umask(0o022)
    try:
        save_model(ours, tmp_path / "shared")
        os.umask(0o077)
        save_model(ours, tmp_path / "private")
    finally:
        os.umask(old)
    mode = lambda p: stat.S_IMODE(p.stat().st_mode)  # noqa: E731
    assert mode(tmp_path / "shared") == 0o755 and mode(tmp_path / "shared" / "model.safetensors") == 0o644
    assert mode(tmp_path / "private") == 0o700 and mode(tmp_path / "private" / "model.safetensors") == 0o600


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda t: t.index_fill(0, torch.tensor([3]), float("nan")), "holds NaN or infinite values"),
        (lambda t: t.index_fill(0, torch.tensor([0]), float("inf")), "holds NaN or infinite values"),
        (lambda t: t.long(), "is torch.int64, expected floating-point weights"),
    ],
)
def test_error_weights_the_model_cannot_use(pair, tmp_path, damage, message):
    ours, _ = pair
    save_model(ours, tmp_path / "m")
    f = tmp_path / "m" / "model.safetensors"
    tensors = load_file(f)
    tensors["model.layers.1.mlp.up_proj.weight"] = damage(tensors["model.layers.1.mlp.up_proj.weight"])
    save_file(tensors, f)
    with pytest.raises(ValueError, match=f"model.safetensors: tensor 'model.layers.1.mlp.up_proj.weight' {message}"):
        load_transformer(tmp_path / "m")


def test_a_model_that_is_not_there_is_named_with_what_is(tmp_path, capsys):
    """Issue 21: `--model ziya-13` (a mistyped name) and a trainer's OUT instead of its best/ got
    "ziya-13/config.json: no config.json"."""
    import train_sft
    from safety import run_main
    from pretrained import load_config

    with pytest.raises(
        FileNotFoundError,
        match=r"^ziya-13: neither a model directory nor a built-in config "
        r"\(tiny, bench-50m, ziya-13b\); did you mean ziya-13b\?$",
    ):
        load_config("ziya-13")
    run = tmp_path / "runs" / "sft"
    for name in ("final", "best", "step-10"):
        (run / name).mkdir(parents=True)
        (run / name / "config.json").write_text("{}")
    with pytest.raises(
        FileNotFoundError,
        match=rf"did you mean {run / 'best'} or {run / 'final'} or "
        rf"{run / 'step-10'}\?$",
    ):
        load_config(run)
    with pytest.raises(FileNotFoundError, match=r"no such model directory"):
        load_config(tmp_path / "nowhere", builtin=False)
    assert load_config("ziya-13b").num_hidden_layers == 40
    assert run_main(train_sft.main, ["--model", "ziya-13", "--dry-run"]) == 2  # one line, no traceback
    assert capsys.readouterr().err.startswith("error: ziya-13: neither a model directory nor a built-in config")
    with pytest.raises(FileNotFoundError, match=rf"did you mean {run / 'best'}"):
        load_transformer(run)  # every loader, not only the trainers'


def test_a_hostile_config_or_file_gets_one_line_and_nothing_is_built_or_written(
    pair, tmp_path, tokenizer_file, monkeypatch, capsys
):
    """Issue 24: num_hidden_layers 1e9 made every loader build layers without end; zero heads,
    negative sizes, wrong types ended in bare ZeroDivisionError/TypeError; convert.py copied such
    a config and a garbage tokenizer.model with exit 0; hostile safetensors headers and a full
    disk at an export were tracebacks with exit 1."""
    import subprocess
    import sys

    import convert
    import generate
    from conftest import ROOT
    from safety import run_main
    from safetensors import SafetensorError

    ours, _ = pair
    d = tmp_path / "m"
    save_model(ours, d, tokenizer=tokenizer_file)
    good = json.loads((d / "config.json").read_text())
    for field, value, says in (
        ("num_hidden_layers", 10**9, "num_hidden_layers must be an integer from 1 to 1,024"),
        ("num_attention_heads", 0, "num_attention_heads must be an integer from 1"),
        ("hidden_size", -64, "hidden_size must be an integer from 1"),
        ("intermediate_size", "96", "intermediate_size must be an integer"),
        ("rms_norm_eps", "tiny", "rms_norm_eps must be a positive number"),
        ("num_hidden_layers", 4, "checkpoint lacks tensors ['model.layers.2."),
    ):
        (d / "config.json").write_text(json.dumps(dict(good, **{field: value})))
        assert run_main(generate.main, ["--model", str(d), "--prompt", "头痛", "--max-new-tokens", "1"]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"error: {d}") and says in err and len(err.splitlines()) == 1, err
    (d / "config.json").write_text(json.dumps(good))
    # convert.py checks what it would write: a garbage tokenizer, tensors its config does not describe.
    src = tmp_path / "src"
    save_model(ours, src, tokenizer=tokenizer_file)
    (src / "tokenizer.model").write_bytes(b"not a sentencepiece model")
    proc = subprocess.run(
        [sys.executable, str(ROOT / "convert.py"), "--src", str(src), "--out", str(tmp_path / "out")],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2 and "not a sentencepiece model" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists()
    (src / "tokenizer.model").unlink()  # (this test model's 101 ids are fewer than the tokenizer's pieces)
    (src / "config.json").write_text(json.dumps(dict(good, intermediate_size=128)))
    with pytest.raises(
        ValueError, match=r"has shape \((96, 64|64, 96)\), but config.json implies \((128, 64|64, 128)\)"
    ):
        convert.convert(src, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    # A safetensors header that claims 2^63 bytes: one line, exit 2.
    (d / "model.safetensors").write_bytes((2**63 - 1).to_bytes(8, "little") + b"{}")
    assert run_main(generate.main, ["--model", str(d), "--prompt", "头痛"]) == 2
    assert "cannot read safetensors file" in capsys.readouterr().err

    # A disk that fills during an export: one line naming where, no half-written directory left.
    def full(*a, **k):
        raise SafetensorError(
            'Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space left on device" })'
        )

    monkeypatch.setattr(checkpoint, "save_file", full)
    assert run_main(lambda argv: save_model(ours, tmp_path / "export"), []) == 2
    assert capsys.readouterr().err.startswith(f"error: {tmp_path / 'export'}: ENOSPC")
    assert not (tmp_path / "export").exists() and not list(tmp_path.glob(".export.tmp-*"))
