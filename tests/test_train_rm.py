"""train_rm.py: the scoring rule, the loss, 1 rank = 2 ranks, sampling, and learning on the
shipped preference pairs from the tiny SFT model."""

import json
import math
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, micro_model, poison_update, trainer_env
from safetensors.torch import save_file

from data.template import DOCTOR_TAG, doctor_turn, pad_batch, render, render_reply
from distill import read_samples
from checkpoint import CheckpointError
from model import CONFIGS, RewardModel
from pretrained import load_reward_model, save_model
from tokenizer import Tokenizer
from train_rm import pairwise_loss

PAIRS = str(ROOT / "data" / "preference" / "preference_pairs.jsonl")
SFT = [str(p) for p in sorted((ROOT / "data" / "sft").glob("*.jsonl"))]
ENV = trainer_env()


@pytest.mark.numerics
def test_pairwise_loss_by_hand():
    def r(*x):  # fp64: the hand-worked values to 1e-12
        return torch.tensor(x, dtype=torch.float64)

    equal = pairwise_loss(r(1.5, -2.0), r(1.5, -2.0))
    torch.testing.assert_close(equal, torch.full((2,), math.log(2), dtype=torch.float64), rtol=1e-12, atol=0)
    # -log σ(2) = log(1 + e^-2); with margin 1: -log σ(1).
    assert pairwise_loss(r(3.0), r(1.0)).item() == pytest.approx(math.log1p(math.exp(-2)), rel=1e-12)
    assert pairwise_loss(r(3.0), r(1.0), margin=1.0).item() == pytest.approx(math.log1p(math.exp(-1)), rel=1e-12)


@pytest.fixture(scope="module")
def reward_model():
    """The tiny reward model in fp64, so that every comparison of scores below is rounding-free:
    1e-9 where two computations differ in shape (padding, batch company), exact where they are
    the same computation (tests/TOLERANCES.md)."""
    torch.manual_seed(0)
    rm = RewardModel(CONFIGS["tiny"])
    rm.trunk.init_weights(seed=1)
    with torch.no_grad():
        rm.score_head.weight.normal_(0, 0.5)
    return rm.double().eval()


@pytest.mark.numerics
def test_reward_ignores_padding_side_and_batch_company(reward_model, tokenizer_file):
    tok = Tokenizer(tokenizer_file)
    msgs = [{"role": "user", "content": "头痛三天了"}]
    a, _ = render_reply(tok, msgs, "有没有发烧？")
    b, _ = render_reply(tok, msgs, "请问疼痛在哪个部位？持续多久了？有没有呕吐？")
    c, _ = render_reply(tok, [{"role": "user", "content": "咳嗽"}], "多喝水")
    with torch.no_grad():
        alone = reward_model(*pad_batch([a], 0))
        right = reward_model(*pad_batch([a, b, c], 0))
        left = reward_model(*pad_batch([b, a, c], 0, left=True))
    torch.testing.assert_close(right[0], alone[0], rtol=0, atol=1e-9)
    torch.testing.assert_close(left[1], alone[0], rtol=0, atol=1e-9)
    torch.testing.assert_close(left[0], right[1], rtol=0, atol=1e-9)
    assert a[-1] == tok.eos_id  # the reward is read at the reply's eos
    # ... which is what the head sees: the hidden state at the last real position.
    with torch.no_grad():
        h = reward_model.trunk(torch.tensor([a]), output="hidden")[0, -1]
        assert reward_model.score_head(h).item() == pytest.approx(alone.item(), rel=0, abs=1e-9)


def test_render_reply_keeps_the_reply_whole(tokenizer_file):
    tok = Tokenizer(tokenizer_file)
    history = [
        {"role": "user", "content": "头痛"},
        {"role": "assistant", "content": "多久了？"},
        {"role": "user", "content": "三天了"},
    ]
    ids, start = render_reply(tok, history, "先量血压。")
    full = render(tok, history + [{"role": "assistant", "content": "先量血压。"}])
    reply = doctor_turn(tok, "先量血压。")[len(tok.encode(DOCTOR_TAG)) :]  # after the tag, up to eos
    assert ids == full.ids and ids[start:] == reply and ids[:start] == render(tok, history).ids
    short, start = render_reply(tok, history, "先量血压。", max_len=len(ids) - 1)
    assert short[start:] == reply  # the reply survives whole
    assert short == render_reply(tok, history[2:], "先量血压。")[0]  # the oldest round went


@pytest.mark.numerics
def test_checkpoint_round_trip(reward_model, tmp_path, tokenizer_file):
    save_model(reward_model, tmp_path / "rm", tokenizer=tokenizer_file)
    loaded = load_reward_model(tmp_path / "rm", dtype=torch.float64)
    tokens = torch.randint(3, 2000, (2, 12))
    with torch.no_grad():  # the same weights, the same computation: the same scores
        ones = torch.ones_like(tokens)
        torch.testing.assert_close(loaded(tokens, ones), reward_model(tokens, ones), rtol=0, atol=1e-12)
    # Issue 26: the HF reward-model layout (it was a causal LM + score_head.safetensors, which
    # transformers opened as a classifier with a random head).
    hf = json.loads((tmp_path / "rm" / "config.json").read_text())
    assert hf["architectures"] == ["LlamaForSequenceClassification"] and hf["num_labels"] == 1
    # The layout before it still loads, and scores the same.
    old = tmp_path / "old"
    save_model(reward_model.trunk, old, tokenizer=tokenizer_file)
    save_file({"weight": reward_model.score_head.weight.detach().contiguous()}, str(old / "score_head.safetensors"))
    with torch.no_grad():
        before = load_reward_model(old, dtype=torch.float64)
        torch.testing.assert_close(before(tokens, ones), reward_model(tokens, ones), rtol=0, atol=1e-12)
    (old / "score_head.safetensors").unlink()  # a causal LM alone is no reward model
    with pytest.raises(CheckpointError, match="not a reward model checkpoint"):
        load_reward_model(old)


@pytest.mark.numerics
def test_reward_models_in_the_hugging_face_layout_both_ways(reward_model, tmp_path, tokenizer_file):
    """Issue 26 item 1: ours opens in transformers' AutoModelForSequenceClassification and
    scores as train_rm.py does; one transformers wrote loads in ours and scores as transformers
    does (the released HuatuoGPT reward model is in another layout: tests/test_convert.py). Right-padded batches of replies that end
    with eos: transformers reads the last token that is not pad_token_id, ours the mask's last."""
    from transformers import AutoConfig, AutoModelForSequenceClassification, LlamaConfig, LlamaForSequenceClassification

    tok = Tokenizer(tokenizer_file)
    msgs = [{"role": "user", "content": "头痛三天了"}]
    seqs = [
        render_reply(tok, msgs, reply)[0] for reply in ("有没有发烧？", "请问疼痛在哪个部位？持续多久了？", "多喝水")
    ]
    tokens, mask = pad_batch(seqs, tok.pad_id)
    save_model(reward_model, tmp_path / "ours", tokenizer=tokenizer_file)
    theirs_of_ours = AutoModelForSequenceClassification.from_pretrained(tmp_path / "ours", dtype=torch.float64).eval()
    with torch.no_grad():  # fp64 both ways: the same scores, rounding aside
        torch.testing.assert_close(
            theirs_of_ours(input_ids=tokens, attention_mask=mask).logits[:, 0],
            reward_model(tokens, mask),
            rtol=0,
            atol=1e-9,
        )
    cfg = LlamaConfig(
        vocab_size=400,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        num_labels=1,
        pad_token_id=0,
    )
    torch.manual_seed(3)
    theirs = LlamaForSequenceClassification(cfg).double().eval()
    with torch.no_grad():
        theirs.score.weight.normal_(0, 1.0)  # scores of order 1, not 0.02's
    theirs.save_pretrained(tmp_path / "theirs")
    ours_of_theirs = load_reward_model(tmp_path / "theirs", dtype=torch.float64).eval()
    with torch.no_grad():
        expected = theirs(input_ids=tokens, attention_mask=mask).logits[:, 0]
        torch.testing.assert_close(ours_of_theirs(tokens, mask), expected, rtol=0, atol=1e-9)
        assert expected.abs().min() > 1e-3  # not a comparison of zeros
    # Issue 35 item 4: a two-label classifier transformers wrote is refused for its labels, not
    # for score.weight's shape: as transformers 5 writes it (neither id2label nor num_labels: its
    # default, 2) and as 4.x wrote it (id2label of two entries, no num_labels).
    two = {k: v for k, v in cfg.to_dict().items() if k not in ("id2label", "label2id")}
    LlamaForSequenceClassification(LlamaConfig(**two, num_labels=2)).save_pretrained(tmp_path / "two")
    hf = json.loads((tmp_path / "two" / "config.json").read_text())
    for written in (hf, {**hf, "id2label": {"0": "LABEL_0", "1": "LABEL_1"}}):
        assert "num_labels" not in written and AutoConfig.for_model(**written).num_labels == 2
        (tmp_path / "two" / "config.json").write_text(json.dumps(written))
        with pytest.raises(CheckpointError, match=r"config.json: 2 labels .*; a reward model needs one label"):
            load_reward_model(tmp_path / "two")


def run_rm(out, *extra, nproc=1, model=None):
    launcher = (
        [sys.executable]
        if nproc == 1
        else [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)]
    )
    cmd = launcher + [
        str(ROOT / "train_rm.py"),
        "--model",
        str(model or micro_model()),
        "--data",
        PAIRS,
        "--out",
        str(out),
        "--batch-size",
        "4",
        "--micro-batch-size",
        "1",
        "--lr",
        "1e-3",
        *extra,
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=trainer_env(nproc), cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_one_rank_equals_two_ranks(tmp_path):
    a = [r["loss"] for r in run_rm(tmp_path / "one", "--max-steps", "4") if "loss" in r]
    b = [r["loss"] for r in run_rm(tmp_path / "two", "--max-steps", "4", nproc=2) if "loss" in r]
    assert a[0] == pytest.approx(math.log(2), abs=1e-6)  # a zero head: no preference yet (logged to 6 decimals)
    assert len(a) == 4 and max(abs(x - y) for x, y in zip(a, b)) < 1e-4, (a, b)  # fp32 runs: tests/TOLERANCES.md


def test_an_update_that_leaves_non_finite_weights_saves_and_exports_nothing(tmp_path, monkeypatch):
    """Issue 44 item 2, for the reward model: an update that leaves NaN weights is never saved
    as the state nor exported as final/; the state on disk stays the last finite one."""
    import train_rm

    poison_update(monkeypatch, train_rm, at=4)  # the last step's: no later loss would show it
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    argv = ["--model", str(micro_model()), "--data", PAIRS, "--out", str(tmp_path), "--batch-size", "4"]
    argv += ["--micro-batch-size", "2", "--lr", "1e-3", "--max-steps", "4", "--save-every", "2", "--eval-every", "100"]
    with pytest.raises(SystemExit) as stop:
        train_rm.main(argv)
    message = str(stop.value)
    assert message.startswith("step 4: the update left weights or optimizer state that are not finite"), message
    assert f"The last good state: {tmp_path / 'state'} (step 2)" in message
    assert json.loads((tmp_path / "state" / "trainer.json").read_text())["step"] == 2
    assert not (tmp_path / "final").exists()


@pytest.fixture(scope="module")
def tiny_sft(tmp_path_factory):
    out = tmp_path_factory.mktemp("sft")
    cmd = [
        sys.executable,
        str(ROOT / "train_sft.py"),
        "--model",
        str(micro_model()),
        "--data",
        *SFT,
        "--out",
        str(out),
        "--batch-size",
        "8",
        "--lr",
        "2e-3",
        "--max-steps",
        "10",
        "--eval-every",
        "10",
    ]
    subprocess.run(cmd, check=True, capture_output=True, env=ENV, cwd=ROOT, timeout=300)
    return out / "best"


def test_held_out_accuracy_rises_above_chance(tiny_sft, tmp_path):
    records = run_rm(tmp_path / "rm", "--model", str(tiny_sft), "--max-steps", "16", "--eval-every", "8")
    accs = [r["val_accuracy"] for r in records if "val_accuracy" in r]
    assert accs[0] == 0.5  # the zero head ties every pair: chance
    assert max(accs) >= 0.75, accs  # 8 held-out pairs
    assert (tmp_path / "rm" / "best" / "model.safetensors").is_file()  # the HF reward-model layout (issue 26)
    card = (tmp_path / "rm" / "best" / "README.md").read_text(encoding="utf-8")  # issue 26: the model card
    assert "# HuatuoGPT, RM checkpoint" in card and "held-out accuracy" in card and "load_reward_model" in card


def test_sample_writes_what_distill_score_reads(tiny_sft, tmp_path):
    out = tmp_path / "samples.jsonl"
    cmd = [
        sys.executable,
        str(ROOT / "train_rm.py"),
        "sample",
        "--model",
        str(tiny_sft),
        "--data",
        SFT[2],
        "--out",
        str(out),
        "-k",
        "2",
        "--limit",
        "3",
        "--max-new-tokens",
        "8",
    ]
    subprocess.run(cmd, check=True, capture_output=True, env=ENV, cwd=ROOT, timeout=300)
    samples = read_samples(out)
    assert len(samples) == 3 and all(len(s["responses"]) == 2 and len(s["finished"]) == 2 for s in samples)
    assert all(s["messages"][-1]["role"] == "user" and s["reference"] for s in samples)
    proc = subprocess.run(
        cmd[:-4] + ["--limit", "4", "--max-new-tokens", "8"],
        check=True,
        capture_output=True,
        text=True,
        env=ENV,
        cwd=ROOT,
        timeout=300,
    )
    assert "1 prompts sampled (3 already done)" in proc.stdout
    assert len(read_samples(out)) == 4


@pytest.mark.numerics
def test_score_ids_scores_exactly_the_ids_the_policy_produced(reward_model, tokenizer_file):
    tok = Tokenizer(tokenizer_file)
    msgs = [{"role": "user", "content": "头痛三天了"}]
    prompt = render(tok, msgs).ids
    reply = render_reply(tok, msgs, "有没有发烧？")[0][len(prompt) :]  # as the policy would sample it
    assert reply[-1] == tok.eos_id
    reply = reply[:-1]
    with torch.no_grad():
        by_text = reward_model(*pad_batch([render_reply(tok, msgs, "有没有发烧？")[0]], 0))
        by_ids = reward_model.score_ids([prompt], [reply], eos_id=tok.eos_id, pad_id=0)
        closed = reward_model.score_ids([prompt], [reply + [tok.eos_id]], eos_id=tok.eos_id, pad_id=0)
    torch.testing.assert_close(by_ids, by_text, rtol=0, atol=0)  # the same ids: the same score
    torch.testing.assert_close(closed, by_ids, rtol=0, atol=0)  # an eos already there is not doubled
    # Sampled ids need not be what encode(decode(ids)) gives; they are scored as they are.
    gen = torch.Generator().manual_seed(0)
    sampled = next(
        ids
        for ids in (torch.randint(3, 400, (6,), generator=gen).tolist() for _ in range(100))
        if tok.encode(tok.decode(ids)) != ids
    )
    with torch.no_grad():
        got = reward_model.score_ids([prompt, prompt], [sampled, reply], eos_id=tok.eos_id, pad_id=0)
        direct = reward_model(torch.tensor([prompt + sampled + [tok.eos_id]]), torch.ones(1, len(prompt) + 7))
        reencoded = reward_model.score_ids([prompt], [tok.encode(tok.decode(sampled))], eos_id=tok.eos_id, pad_id=0)
    torch.testing.assert_close(got[0], direct[0], rtol=0, atol=1e-9)  # fp64; padded beside another row, or alone
    assert abs(got[0].item() - reencoded.item()) > 1e-4
    with pytest.raises(ValueError, match="exceeds the reward model's context of 2048"):
        reward_model.score_ids([prompt], [reply * 400], eos_id=tok.eos_id, pad_id=0)


def test_pairs_too_long_are_skipped_and_counted(tokenizer_file):
    from data.readers import read
    from data.schema import Report
    from train_rm import encode_pairs

    tok = Tokenizer(tokenizer_file)
    records = list(read(PAIRS, "pairs"))
    report = Report()
    pairs = encode_pairs(records, tok, 480, report)  # with this tokenizer, 387 to 609 tokens
    assert 0 < len(pairs) < len(records)
    assert sum(report.skipped.values()) == len(records) - len(pairs)
    assert all(len(p["chosen_ids"]) <= 480 and len(p["rejected_ids"]) <= 480 for p in pairs)


def test_sample_and_score_skip_and_count_what_they_cannot_use(tiny_sft, reward_model, tokenizer_file, tmp_path):
    data = tmp_path / "prompts.jsonl"
    rows = [
        {
            "id": "ok",
            "source": "t",
            "messages": [{"role": "user", "content": "头痛"}, {"role": "assistant", "content": "多久了？"}],
        },
        {"id": "open", "source": "t", "messages": [{"role": "user", "content": "咳嗽怎么办"}]},
        {
            "id": "long",
            "source": "t",
            "messages": [
                {"role": "user", "content": "头痛发热咳嗽" * 800},
                {"role": "assistant", "content": "请就医。"},
            ],
        },
    ]
    data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    out = tmp_path / "samples.jsonl"
    cmd = [
        sys.executable,
        str(ROOT / "train_rm.py"),
        "sample",
        "--model",
        str(tiny_sft),
        "--data",
        str(data),
        "--out",
        str(out),
        "-k",
        "2",
        "--max-new-tokens",
        "8",
        "--device",
        "cpu",
        "--dtype",
        "bfloat16",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert [s["id"] for s in read_samples(out)] == ["ok"]
    assert (
        "skipped 1 record(s): no real doctor's answer" in proc.stderr
        and "skipped 1 record(s): question longer" in proc.stderr
    )
    save_model(reward_model, tmp_path / "rm", tokenizer=tokenizer_file)
    cmd = [sys.executable, str(ROOT / "train_rm.py"), "score", "--model", str(tmp_path / "rm"), "--data", str(data)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert [json.loads(line)["id"] for line in proc.stdout.splitlines()] == ["ok"]
    assert "no reply to score" in proc.stderr and "longer than the model's context" in proc.stderr


def test_split_by_prompt_keeps_each_prompt_on_one_side():
    from train_rm import split_by_prompt

    def pair(q, c, r):
        return {
            "id": f"{q}:{c}",
            "source": "t",
            "messages": [{"role": "user", "content": q}],
            "chosen": c,
            "rejected": r,
        }

    # 10 prompts with 3 pairs each (k = 3 responses: 3 pairs), as distill.py score writes them.
    records = [pair(f"问题{p}", f"回答{a}", f"回答{b}") for p in range(10) for a, b in ((0, 1), (0, 2), (1, 2))]
    train, val = split_by_prompt(records + records[:2], 0.2, seed=0)  # two exact duplicates too
    prompts = lambda rs: {r["messages"][0]["content"] for r in rs}  # noqa: E731
    assert len(prompts(val)) == 2 and not prompts(train) & prompts(val)
    assert len(train) + len(val) == 30  # duplicates dropped, nothing else
    again = split_by_prompt(list(reversed(records)), 0.2, seed=0)  # the order of the data does not matter
    assert prompts(again[1]) == prompts(val)


def test_sampling_prompts_come_from_real_doctors():
    from train_rm import doctor_prompt

    q = {"role": "user", "content": "头痛三天了"}
    polished = {"role": "assistant", "content": "您好，头痛持续三天……"}
    assert doctor_prompt({"source": "distilled_instruction", "messages": [q, polished]}) is None
    assert doctor_prompt(
        {"source": "real_instruction", "messages": [q, polished], "meta": {"original_answer": "量个血压"}}
    ) == ([q], "量个血压")
    original = [
        {"role": "user", "content": "头疼"},
        {"role": "assistant", "content": "几天了"},
        {"role": "user", "content": "三天"},
        {"role": "assistant", "content": "先量血压"},
    ]
    rewritten = [q, polished, q, polished]
    assert doctor_prompt({"source": "real_conversation", "messages": rewritten, "meta": {"original": original}}) == (
        original[:3],
        "先量血压",
    )
    assert doctor_prompt({"source": "cmedqa2", "messages": [q, {"role": "assistant", "content": "多休息"}]}) == (
        [q],
        "多休息",
    )
