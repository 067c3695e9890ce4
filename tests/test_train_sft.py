"""train_sft.py and training.py: 1 rank = 2 ranks, exact resume after SIGKILL, the NaN guard,
the loss mask, the best checkpoint, and the guards that run before training."""

import contextlib
import itertools
import json
import math
import os
import pickle
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch
from conftest import ROOT, micro_model, poison_update, trainer_env, two_nodes

from data.template import collate, doctor_turn, render
from model import CONFIGS, Transformer
from pretrained import load_transformer, save_model
from tokenizer import Tokenizer
from plan import training_memory
from training import cosine_lr

SFT = [str(p) for p in sorted((ROOT / "data" / "sft").glob("*.jsonl"))]
COMMON = ["--model", str(micro_model()), "--batch-size", "8", "--micro-batch-size", "2", "--lr", "2e-3", "--seed", "0"]
ENV = trainer_env()


def run(out, *extra, nproc=1, check=True):
    launcher = (
        [sys.executable]
        if nproc == 1
        else [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)]
    )
    cmd = launcher + [str(ROOT / "train_sft.py"), "--data", *SFT, "--out", str(out), *COMMON, *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=trainer_env(nproc), cwd=ROOT, timeout=300)
    if check and proc.returncode:
        raise AssertionError(f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def records(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def losses(out):
    return [r["loss"] for r in records(out) if "loss" in r]


def weights(directory):
    from safetensors.torch import load_file

    return load_file(directory / "model.safetensors")


def test_one_rank_equals_two_ranks_and_two_nodes(tmp_path):
    run(tmp_path / "one", "--max-steps", "4")
    run(tmp_path / "two", "--max-steps", "4", nproc=2)
    a, b = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert len(a) == 4 and a[0] > a[-1]
    # fp32 trainer runs, losses logged to 6 decimals: 1 and 2 ranks run each item's forward alike
    # and sum the same terms in another order, fp32 reorderings of ~1e-7 relative carried over 4
    # AdamW steps; equal to the logged digit here, 1e-4 is that with room (tests/TOLERANCES.md).
    assert max(abs(x - y) for x, y in zip(a, b)) < 1e-4, (a, b)
    wa, wb = weights(tmp_path / "one" / "final"), weights(tmp_path / "two" / "final")
    for k in wa:  # Adam can turn a 1e-9 gradient difference into one weight off by ~lr: compare norms
        assert (wa[k] - wb[k]).norm() <= 1e-4 * wa[k].norm(), k
    # The saved model is an HF checkpoint with its tokenizer.
    assert (tmp_path / "two" / "final" / "tokenizer.model").is_file()
    # Issue 33 item 2: 2 nodes of 1 rank (two torchruns meeting by a c10d rendezvous on loopback)
    # give what 1 node of 2 ranks gives, to the bit: the data, the seeds and who writes go by the
    # global rank, only the device by the local one. Issue 34 item 2: exported with --save-dtype
    # bfloat16, each tensor is then the round-to-nearest-even of the fp32 weight the 2-rank run
    # exported, and transformers opens it in bf16; the resumable state stays fp32.
    shared = ["--data", *SFT, "--out", str(tmp_path / "nodes"), *COMMON, "--max-steps", "4", "--save-dtype", "bfloat16"]
    for proc in two_nodes("train_sft.py", shared, shared):
        assert proc.returncode == 0, proc.stderr[-3000:]
    assert losses(tmp_path / "nodes") == b
    wn = weights(tmp_path / "nodes" / "final")
    assert wn.keys() == wb.keys() and all(wb[k].dtype == torch.float32 for k in wb)
    assert all(wn[k].dtype == torch.bfloat16 and torch.equal(wn[k], wb[k].to(torch.bfloat16)) for k in wb)
    assert json.loads((tmp_path / "nodes" / "final" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    from transformers import LlamaForCausalLM

    assert LlamaForCausalLM.from_pretrained(tmp_path / "nodes" / "final", dtype="auto").dtype == torch.bfloat16
    assert [f.stat().st_size for f in sorted((tmp_path / "nodes" / "state").glob("*.distcp"))] == [
        f.stat().st_size for f in sorted((tmp_path / "two" / "state").glob("*.distcp"))
    ]  # the state: fp32 both


def test_the_base_models_dtype_is_the_default_export_dtype():
    """Issue 34 item 2: by default best/ and final/ are in the base model's dtype (config.json's
    torch_dtype, or `dtype` as newer transformers write it; Ziya's release says float16), bf16
    for a built-in config; --save-dtype overrides it. (The export itself: above.)"""
    from training import save_dtype

    with tempfile.TemporaryDirectory() as tmp:
        for name, text in (("ziya", '{"torch_dtype": "float16"}'), ("new", '{"dtype": "bfloat16"}')):
            (Path(tmp) / name).mkdir()
            (Path(tmp) / name / "config.json").write_text(text)
        assert save_dtype(None, f"{tmp}/ziya") == torch.float16 and save_dtype(None, f"{tmp}/new") == torch.bfloat16
        assert save_dtype("float32", f"{tmp}/ziya") == torch.float32
    assert save_dtype(None, "tiny") == torch.bfloat16
    assert save_dtype(None, str(micro_model())) == torch.float32  # what the other trainer tests export


def test_an_out_that_is_each_nodes_own_disk_is_refused_before_any_work(tmp_path):
    """Issue 33 item 2: two nodes (as above), each with its own --out, as two local disks: both
    stop at start-up with one line naming the ranks that do not see rank 0's directory, and
    nothing is trained or saved on either."""
    disks = [tmp_path / "disk-a" / "run", tmp_path / "disk-b" / "run"]
    procs = two_nodes(
        "train_sft.py", *[["--data", *SFT, "--out", str(d), *COMMON, "--max-steps", "3"] for d in disks], timeout=120
    )
    for proc in procs:
        assert proc.returncode != 0
        assert "is not the same directory on every rank: rank(s) 1 do not see what rank 0 wrote" in proc.stderr, (
            proc.stderr[-3000:]
        )
        assert 'train_sft.py", line' not in proc.stderr  # no worker's traceback (torchrun's own is its own)
    assert not [p for d in disks if d.exists() for p in d.iterdir() if p.name != ".lock"]


def test_sigkill_and_resume_equals_uninterrupted(tmp_path):
    args = ["--max-steps", "8", "--save-every", "2", "--eval-every", "3"]
    run(tmp_path / "whole", *args)
    out = tmp_path / "killed"
    cmd = [sys.executable, str(ROOT / "train_sft.py"), "--data", *SFT, "--out", str(out), *COMMON, *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV, cwd=ROOT)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        m = out / "metrics.jsonl"
        if m.is_file() and any(r.get("step") == 5 and "loss" in r for r in records(out)):
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, "the run ended before it could be killed"
    saved = json.loads((out / "state" / "trainer.json").read_text())["step"]
    assert 2 <= saved < 8
    run(out, *args, "--resume")
    assert losses(out) == losses(tmp_path / "whole")  # metrics of the lost steps were redone, once
    a, b = weights(tmp_path / "whole" / "final"), weights(out / "final")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    a, b = weights(tmp_path / "whole" / "best"), weights(out / "best")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_nan_guard_stops_and_keeps_the_last_good_state(tmp_path, monkeypatch, capsys):
    import train_sft

    real, calls = train_sft.train_step, []

    def nan_at_step_5(*args, **kwargs):  # the loop calls train_step once per optimizer step
        calls.append(1)
        loss, norm = real(*args, **kwargs)
        return (float("nan"), norm) if len(calls) == 5 else (loss, norm)

    monkeypatch.setattr(train_sft, "train_step", nan_at_step_5)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    argv = ["--data", *SFT, "--out", str(tmp_path), *COMMON, "--max-steps", "8", "--save-every", "2"]
    with pytest.raises(SystemExit) as stop:
        train_sft.main(argv)
    message = str(stop.value)
    assert "step 5: loss nan" in message and "not finite" in message
    assert f"{tmp_path / 'state'} (step 4)" in message  # it names the state that exists
    assert json.loads((tmp_path / "state" / "trainer.json").read_text())["step"] == 4
    assert not (tmp_path / "final").exists()
    assert [r["step"] for r in records(tmp_path) if "loss" in r] == [1, 2, 3, 4]
    # The kept state resumes cleanly (without the fault) to the end.
    monkeypatch.setattr(train_sft, "train_step", real)
    train_sft.main(argv + ["--resume"])
    assert len(losses(tmp_path)) == 8 and all(math.isfinite(x) for x in losses(tmp_path))


def test_an_update_that_leaves_non_finite_weights_saves_nothing_and_the_last_good_state_resumes(tmp_path, monkeypatch):
    """Issue 44 item 2: when step 2's update left NaN weights (the loss and gradient were
    finite), the run saved state/ from them over step 1's, then called it "the last good
    state"; resuming stopped at once. Now nothing is saved from them, the message names step 1's
    state truthfully, and resuming with a lower --lr trains on to the end."""
    import train_sft

    poison_update(monkeypatch, train_sft, at=2)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    argv = ["--data", *SFT, "--out", str(tmp_path), *COMMON, "--max-steps", "4", "--save-every", "1"]
    with pytest.raises(SystemExit) as stop:
        train_sft.main(argv)
    message = str(stop.value)
    assert message.startswith("step 2: the update left weights or optimizer state that are not finite"), message
    assert f"The last good state: {tmp_path / 'state'} (step 1)" in message and "--allow-change lr" in message
    assert json.loads((tmp_path / "state" / "trainer.json").read_text())["step"] == 1
    assert not (tmp_path / "final").exists()
    monkeypatch.undo()
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    train_sft.main(
        [*argv[:-4], "--lr", "1e-3", "--max-steps", "4", "--save-every", "1", "--resume", "--allow-change", "lr"]
    )
    assert [r["step"] for r in records(tmp_path) if "loss" in r] == [1, 2, 3, 4]
    assert all(math.isfinite(x) for x in losses(tmp_path))
    assert all(torch.isfinite(t).all() for t in weights(tmp_path / "final").values())


def test_best_checkpoint_reproduces_its_validation_loss(tmp_path):
    val = ROOT / "data" / "sft" / "doctor_qa.jsonl"
    train = [f for f in SFT if "doctor_qa" not in f]
    cmd = [
        sys.executable,
        str(ROOT / "train_sft.py"),
        "--data",
        *train,
        "--val-data",
        str(val),
        "--out",
        str(tmp_path),
        *COMMON,
        "--max-steps",
        "6",
        "--eval-every",
        "2",
    ]
    subprocess.run(cmd, check=True, capture_output=True, env=ENV, cwd=ROOT)
    best = min(r["val_loss"] for r in records(tmp_path) if "val_loss" in r)
    model = load_transformer(tmp_path / "best").eval()
    tok = Tokenizer(tmp_path / "best" / "tokenizer.model")
    from data.readers import read_schema
    from train_sft import n_labels, token_loss_sum

    items = [render(tok, r["messages"], max_len=512) for r in read_schema(val)]
    with torch.no_grad():
        total = sum(token_loss_sum(model, collate([x], tok.pad_id)).item() for x in items)
    # The trainer's fp32 validation (its own batches), logged to 6 decimals, against one
    # conversation at a time: 5e-7 apart here in fp32 and in fp64 alike, the log's rounding
    # (tests/TOLERANCES.md).
    assert abs(total / sum(n_labels(x) for x in items) - best) < 1e-4


@pytest.mark.numerics
def test_masked_and_padded_tokens_do_not_move_the_loss(tokenizer_file):
    from train_sft import token_loss_sum

    tok = Tokenizer(tokenizer_file)
    model = Transformer.from_config(CONFIGS["tiny"], seed=0).double().eval()  # fp64: rounding-free bounds
    conv = [{"role": "user", "content": "头痛三天了"}, {"role": "assistant", "content": "有没有发烧？"}]
    other_question = [{"role": "user", "content": "孩子咳嗽，晚上更厉害，怎么办"}, conv[1]]
    short, long = render(tok, conv), render(tok, other_question)
    with torch.no_grad():
        alone = token_loss_sum(model, collate([short], tok.pad_id))
        padded = collate([short, long], tok.pad_id)
        padded["tokens"][0, len(short.ids) :] = 77  # garbage where padding is: labels are -100
        in_batch = token_loss_sum(model, {k: v[:1] for k, v in padded.items()})
        # By hand: the mean of -log p over exactly the answer tokens and the eos.
        logits = model(torch.tensor([short.ids]))[0, :-1].log_softmax(-1)
        targets = torch.tensor(short.ids[1:])
        keep = torch.tensor(short.labels[1:]) != -100
        by_hand = -logits[keep].gather(-1, targets[keep][:, None]).sum()
    torch.testing.assert_close(in_batch, alone, rtol=0, atol=1e-9)  # another batch shape: other kernels
    torch.testing.assert_close(alone, by_hand, rtol=0, atol=1e-9)
    assert int(keep.sum()) == len(doctor_turn(tok, "有没有发烧？"))  # the doctor's whole turn, as officially


def test_errors_before_training(tmp_path, tokenizer_file):
    proc = run(tmp_path / "ctx", "--max-len", "4096", check=False)
    assert proc.returncode and "--max-len 4096 exceeds the model's context of 2048" in proc.stderr
    proc = run(tmp_path / "batch", "--batch-size", "6", "--micro-batch-size", "4", check=False)
    assert proc.returncode and "--batch-size 6 is not a multiple" in proc.stderr
    # A model whose embedding is smaller than its tokenizer.
    cfg = CONFIGS["tiny"].__class__(**{**CONFIGS["tiny"].__dict__, "vocab_size": 100})
    save_model(Transformer.from_config(cfg), tmp_path / "small", tokenizer=tokenizer_file)
    cmd = [
        sys.executable,
        str(ROOT / "train_sft.py"),
        "--model",
        str(tmp_path / "small"),
        "--data",
        *SFT,
        "--out",
        str(tmp_path / "o"),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=ENV, cwd=ROOT)
    assert proc.returncode and "tokenizer has" in proc.stderr and "embeds only 100 ids" in proc.stderr
    assert not (tmp_path / "o" / "metrics.jsonl").exists()


def test_data_is_checked_before_the_weights_are_read(tmp_path, tokenizer_file):
    save_model(Transformer.from_config("tiny"), tmp_path / "m", tokenizer=tokenizer_file)
    (tmp_path / "m" / "model.safetensors").write_bytes(b"\xff" * 64)  # reading it would fail
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "a", "source": "t", "messages": [{"role": "user", "content": "头痛"}]}\n{not json\n')
    cmd = [
        sys.executable,
        str(ROOT / "train_sft.py"),
        "--model",
        str(tmp_path / "m"),
        "--data",
        str(bad),
        "--out",
        str(tmp_path / "o"),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=120)
    assert proc.returncode and f"{bad}:2: not valid JSON" in proc.stderr and "safetensors" not in proc.stderr


def test_dry_run_plans_the_paper_run():
    def plan(*extra):
        proc = subprocess.run(
            [
                sys.executable,
                str(ROOT / "train_sft.py"),
                "--model",
                "ziya-13b",
                "--dry-run",
                "--world-size",
                "8",
                *extra,
            ],
            capture_output=True,
            text=True,
            env=ENV,
            cwd=ROOT,
            check=True,
        )
        assert "13.09B parameters, 8 ranks, sequences of 2048 tokens" in proc.stdout
        return {line.split()[1]: line for line in proc.stdout.splitlines() if line.startswith("micro-batch")}

    rows = plan()
    assert rows["2"].endswith("yes | yes")  # the paper's run fits an 80 GB A100 at micro-batch 2 ...
    assert rows["16"].endswith("no | yes")  # ... and only checkpointing makes micro-batch 16 fit
    assert rows["2"].split()[3] == "6.1"  # each rank holds 1/8 of the fp32 gradient: 13.09e9 * 4 / 8 bytes
    # Keeping the whole gradient until the last micro-batch costs 4 bytes a parameter on every rank.
    rows = plan("--grad-sync", "last")
    assert rows["2"].split()[3] == "48.8" and rows["2"].endswith("no | yes")


def test_cosine_schedule_by_hand():
    # 100 steps, 10 of warmup: 0.1, 0.2, ... 1.0, then the cosine from the peak at step 11.
    assert cosine_lr(1, 100, 1.0, 10) == pytest.approx(0.1)
    assert cosine_lr(10, 100, 1.0, 10) == pytest.approx(1.0)
    assert cosine_lr(11, 100, 1.0, 10) == pytest.approx(1.0)
    assert cosine_lr(56, 100, 1.0, 10) == pytest.approx(0.5)  # progress (56 - 11) / 90 = 1/2
    assert cosine_lr(100, 100, 1.0, 10) == pytest.approx(0.5 * (1 + math.cos(math.pi * 89 / 90)))
    # Every step trains: a 1-step run at the peak, and no step at the floor.
    assert cosine_lr(1, 1, 2.0, 0) == pytest.approx(2.0)
    for total, warmup in ((1, 0), (2, 0), (7, 1), (100, 10)):
        lrs = [cosine_lr(s, total, 1.0, warmup, floor=0.01) for s in range(1, total + 1)]
        assert min(lrs) > 0.01 and max(lrs) == pytest.approx(1.0), (total, warmup, lrs)


def test_memory_estimate_by_hand():
    cfg = CONFIGS["tiny"]
    n = cfg.num_params()
    m = training_memory(cfg, world=4, micro_batch=2, seq_len=100, bf16=False, activation_checkpointing=False)
    assert m["states"] == pytest.approx(12 * n / 4 / 2**30)
    assert m["grads"] == pytest.approx(4 * n / 4 / 2**30)
    # Per token and block (fp32 compute): the two norms' fp32 inputs 2 x 4 x 256, and 4 bytes for
    # each of the norms' outputs and the projections' normed inputs (4 x 256), q and k after
    # RoPE, v and attention's output (4 x 256), gate, up, silu(gate) and the product (4 x 688).
    per_layer = 2 * 100 * (8 * 256 + 4 * (4 * 256 + 4 * 256 + 4 * 688))
    logits = 2 * 100 * 4096 * 8
    assert m["activations"] == pytest.approx((4 * per_layer + logits) / 2**30)
    ac = training_memory(cfg, world=4, micro_batch=2, seq_len=100, bf16=False, activation_checkpointing=True)
    assert ac["activations"] == pytest.approx((4 * 200 * 256 * 4 + per_layer + logits) / 2**30)
    last = training_memory(
        cfg, world=4, micro_batch=2, seq_len=100, bf16=False, activation_checkpointing=False, grad_sync="last"
    )
    assert last["grads"] == pytest.approx(4 * n / 2**30)
    assert last["total"] - m["total"] == pytest.approx(3 * n / 2**30)


def test_unanswered_last_questions_are_counted_not_silently_dropped(tmp_path):
    from data.corpus import read_sources
    from data.schema import Report

    q, a = {"role": "user", "content": "头痛"}, {"role": "assistant", "content": "多久了？"}
    rows = [
        {"id": "whole", "source": "t", "messages": [q, a]},
        {"id": "open-end", "source": "t", "messages": [q, a, q]},
        {"id": "question", "source": "t", "messages": [q]},
    ]
    f = tmp_path / "d.jsonl"
    f.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    report = Report()
    (source,) = read_sources([f], report)
    assert [(r["id"], len(r["messages"])) for r in source.records] == [("whole", 2), ("open-end", 2)]
    assert sum(report.skipped.values()) == 1 and sum(report.notes.values()) == 1
    assert "question" in report.summary() and "open-end" in report.summary()


# -- reliability of OUT: what a crash, a crafted state or a second run can do -------------------


@contextlib.contextmanager
def interrupted_at_step(monkeypatch, n: int):
    """Inside, train_sft's n-th optimizer step from here raises KeyboardInterrupt before it runs,
    as a kill there would stop the run; the real step is back afterwards."""
    import train_sft

    real, calls = train_sft.train_step, []

    def interrupted(*a, **kw):
        calls.append(1)
        if len(calls) == n:
            raise KeyboardInterrupt
        return real(*a, **kw)

    monkeypatch.setattr(train_sft, "train_step", interrupted)
    try:
        yield
    finally:
        monkeypatch.setattr(train_sft, "train_step", real)


def in_process(monkeypatch, out, *extra):
    import train_sft

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    return train_sft.main(["--data", *SFT, "--out", str(out), *COMMON, *extra])


def test_resume_refuses_a_crafted_state_and_runs_nothing(tmp_path, monkeypatch):
    torch.set_num_threads(1)
    in_process(monkeypatch, tmp_path, "--max-steps", "1")
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    (tmp_path / "state" / ".metadata").write_bytes(pickle.dumps(Payload()))
    with pytest.raises(SystemExit, match=r"state: refusing to load this state: it names posix.system"):
        in_process(monkeypatch, tmp_path, "--max-steps", "1", "--resume")
    assert not marker.exists()


def test_a_kill_between_the_state_renames_resumes_exactly(tmp_path, monkeypatch):
    import training

    torch.set_num_threads(1)
    args = ["--max-steps", "6", "--save-every", "2", "--eval-every", "3"]
    in_process(monkeypatch, tmp_path / "whole", *args)
    out = tmp_path / "killed"
    real_swap, swaps = training.replace_dir, []

    def killed_at_step_4(tmp, final, aside=None):  # the second save: only the first rename happens
        swaps.append(1)
        if len(swaps) == 2:
            os.rename(final, final.with_name(final.name + ".old"))
            raise KeyboardInterrupt("killed between the two renames")
        real_swap(tmp, final, aside)

    monkeypatch.setattr(training, "replace_dir", killed_at_step_4)
    with pytest.raises(KeyboardInterrupt):
        in_process(monkeypatch, out, *args)
    monkeypatch.setattr(training, "replace_dir", real_swap)
    assert not (out / "state").exists() and (out / "state.tmp" / "trainer.json").is_file()
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "loss": 1.2')  # and a last line cut short
    (out / ".best.tmp-leftover").mkdir()
    in_process(monkeypatch, out, *args, "--resume")
    assert losses(out) == losses(tmp_path / "whole")  # from step 4, not from 0, and nothing twice
    a, b = weights(tmp_path / "whole" / "final"), weights(out / "final")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert sorted(p.name for p in out.iterdir() if p.name.startswith((".best", "state."))) == []


@pytest.mark.parametrize("damage", ["cut short", "a listed file missing"])
def test_a_first_save_cut_short_is_set_aside_not_promoted_and_the_run_starts_over(
    tmp_path, monkeypatch, capsys, damage
):
    """Issue 44 item 3: a kill or a full disk that cut trainer.json short while the first state
    was written (state.tmp with a partial trainer.json, no state/) was "recovered" into state/,
    then refused as damaged (exit 2): the run could neither resume nor start without
    --overwrite. Now the partial state is set aside (said), and the run starts from the
    beginning and ends as an uninterrupted one."""
    torch.set_num_threads(1)
    args = ["--max-steps", "2", "--save-every", "1", "--eval-every", "100"]
    in_process(monkeypatch, tmp_path / "whole", *args)
    out = tmp_path / "cut"
    in_process(monkeypatch, out, "--max-steps", "1", "--save-every", "1", "--eval-every", "100")
    shutil.rmtree(out / "final")
    os.rename(out / "state", out / "state.tmp")  # the first save, interrupted before its rename
    trainer = out / "state.tmp" / "trainer.json"
    if damage == "cut short":
        trainer.write_bytes(trainer.read_bytes()[:-40])
    else:
        next(p for p in (out / "state.tmp").iterdir() if p.name.endswith(".distcp")).unlink()
    capsys.readouterr()  # metrics.jsonl keeps the first try's step 1: the run starting over drops it
    in_process(monkeypatch, out, *args, "--resume")
    printed = capsys.readouterr().out
    assert f"{out / 'state.tmp'}: an interrupted save left it partial" in printed
    assert f"set aside as {out / 'state.partial'}, not used" in printed and "recovered" not in printed
    assert f"--resume: no state in {out}, starting from the beginning" in printed
    assert losses(out) == losses(tmp_path / "whole") and (out / "state.partial" / "trainer.json").is_file()


def test_an_earlier_run_is_never_overwritten_silently(tmp_path, monkeypatch):
    from safety import lock_out

    torch.set_num_threads(1)
    in_process(monkeypatch, tmp_path, "--max-steps", "1")
    before = (tmp_path / "metrics.jsonl").read_text()
    with pytest.raises(SystemExit, match=r"holds an earlier run \(metrics.jsonl, state, best, final\): add --resume"):
        in_process(monkeypatch, tmp_path, "--max-steps", "1")
    assert (tmp_path / "metrics.jsonl").read_text() == before
    held = lock_out(tmp_path)  # another run holds the directory
    with pytest.raises(SystemExit, match="another run is using this directory"):
        in_process(monkeypatch, tmp_path, "--max-steps", "1", "--resume")
    held.close()
    in_process(monkeypatch, tmp_path, "--max-steps", "1", "--overwrite")
    assert len(losses(tmp_path)) == 1  # one run's records, not two interleaved


def micro_in_shard_files(out: Path) -> Path:
    """micro_model written again in shard files of at most 100 kB (6 of them): a checkpoint laid
    out as a 13B one is, in miniature."""
    save_model(
        load_transformer(micro_model()), out, tokenizer=micro_model() / "tokenizer.model", max_shard_bytes=100_000
    )
    return out


def test_rank_0_reads_and_scatters_one_shard_file_at_a_time(tmp_path, monkeypatch):
    """Issue 34 item 3: a checkpoint in several shard files is read and scattered file by file
    (pretrained.read_transformer, distributed.load_sharded), so rank 0 holds one file's tensors at
    a time, not the model (48.8 GiB at 13B in fp32). Logged by hooks on the reads and on the
    scatters: each file's tensors all go out before the next file is opened (before, every file
    was read, then the whole state dict went out once). With --lr 0 the exported weights are the
    checkpoint's, to the bit."""
    import checkpoint
    import distributed
    import train_sft

    sharded = micro_in_shard_files(tmp_path / "sharded")
    files = sorted(sharded.glob("model-*.safetensors"))
    assert len(files) >= 4
    log = []
    read, scatter = checkpoint.read_safetensors, distributed.set_model_state_dict

    def reading(file, keep=None):
        log.append(("read", Path(file).name))
        yield from read(file, keep)

    def scattering(module, state_dict, options):
        log.append(("scatter", sorted(state_dict)))
        return scatter(module, state_dict, options=options)

    monkeypatch.setattr(checkpoint, "read_safetensors", reading)
    monkeypatch.setattr(distributed, "set_model_state_dict", scattering)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    train_sft.main(
        [
            "--data",
            *SFT,
            "--out",
            str(tmp_path / "run"),
            "--model",
            str(sharded),
            *COMMON[2:],
            "--max-steps",
            "1",
            "--lr",
            "0",
        ]
    )
    held = {f.name: sorted(k.removeprefix("model.") for k, _ in read(f)) for f in files}
    order = [name for what, name in log if what == "read"]
    assert sorted(order) == sorted(held)  # each file read once, in the index's order
    assert log[: 2 * len(files)] == [e for name in order for e in (("read", name), ("scatter", held[name]))], log
    exported = weights(tmp_path / "run" / "final")
    ours = {k: v for f in files for k, v in read(f)}
    assert exported.keys() == ours.keys() and all(torch.equal(exported[k], ours[k]) for k in ours)


def test_a_shard_file_rank_0_cannot_read_stops_every_rank_at_once(tmp_path):
    """A damaged shard file of the base model, on 2 ranks: rank 0 names it in one line, rank 1
    says that rank 0 could not read the weights, and both end at once (load_sharded broadcasts
    the failure), not after --dist-timeout in a collective rank 0 never joins."""
    sharded = micro_in_shard_files(tmp_path / "sharded")
    damaged = sorted(sharded.glob("model-*.safetensors"))[1]
    damaged.write_bytes(damaged.read_bytes()[:-1000])  # its header intact, its data cut short
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        str(ROOT / "train_sft.py"),
        "--data",
        *SFT,
        "--out",
        str(tmp_path / "run"),
        "--model",
        str(sharded),
        *COMMON[2:],
    ]
    start = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=trainer_env(2), cwd=ROOT, timeout=300)
    assert proc.returncode != 0 and time.time() - start < 200  # at once, not after --dist-timeout's 30 min
    assert f"error: {damaged}" in proc.stderr and "error: rank 0 could not read the weights" in proc.stderr, (
        proc.stderr[-3000:]
    )
    assert 'train_sft.py", line' not in proc.stderr  # no worker's traceback


def test_the_rendered_corpus_on_disk_gives_the_same_batches_in_a_fraction_of_the_memory(tokenizer_file, tmp_path):
    """Issue 34 item 1: train_sft.py renders its data once into a cache entry (data.corpus) and
    every rank maps it. Its batches are those of the conversations rendered in memory, to the
    bit: the same order (the sampler reads the same lengths), tokens, labels, mask and labelled-
    token counts, over two epochs. Opening it costs a few bytes a conversation, none a token
    (tracemalloc: the lists rendered in memory hold ~23 bytes a token with this tokenizer)."""
    import tracemalloc

    from data import corpus
    from data.mixing import LengthGroupedBatches, mix
    from data.schema import Report
    from train_sft import n_labels

    tok = Tokenizer(tokenizer_file)
    train, val, _ = mix(corpus.read_sources(SFT, Report()), seed=5, val_fraction=0.1)
    in_memory = {
        name: [x for r in records if (x := render(tok, r["messages"], max_len=512)) is not None]
        for name, records in (("train", train), ("val", val))
    }
    meta = corpus.build_entry(
        tmp_path / "entry", {"k": 1}, lambda: corpus.sft_data(SFT, None, tok, max_len=512, seed=5, val_fraction=0.1)
    )
    tracemalloc.start()
    try:
        opened = {name: corpus.Corpus(tmp_path / "entry" / name) for name in ("train", "val")}
        lengths = opened["train"].lengths
        held = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    tokens = sum(len(x.ids) for x in in_memory["train"])
    assert meta["train"] == {"items": len(in_memory["train"]), "tokens": tokens} and len(in_memory["val"]) > 5
    assert held < 200 * len(lengths) < tokens, (held, tokens)

    def epochs(lengths):  # the sampler runs on (a run's steps cross epochs): its first two
        sampler = LengthGroupedBatches(lengths, 8, seed=3, drop_last=True)
        return [list(b) for b in itertools.islice(iter(sampler), 2 * len(sampler))]

    order = epochs([len(x.ids) for x in in_memory["train"]])
    assert order == epochs(lengths)
    for name, batches in (("train", order), ("val", [range(len(in_memory["val"]))])):
        mine, theirs = in_memory[name], opened[name]
        for batch in batches:
            a, b = collate([mine[i] for i in batch], 0), collate([theirs[i] for i in batch], 0)
            assert a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)
            assert [n_labels(mine[i]) for i in batch] == [n_labels(theirs[i]) for i in batch]
    assert [len(x.ids) for x in opened["val"][1::2]] == [len(x.ids) for x in in_memory["val"][1::2]]


def test_a_rerun_maps_the_rendered_data_without_reading_it_and_takes_no_partial_entry(tmp_path, monkeypatch, capsys):
    """The cache of train_sft.rendered_data: a second run with the same data, tokenizer and
    settings finds its entry and neither reads nor renders the data (the reader would fail
    here); another --max-len, or other data, is another entry; a damaged entry (an array cut
    short, as a full disk leaves it) or a build's leftover is never taken but rendered anew."""
    import argparse

    import train_sft
    from data import corpus
    from training import train_tiny_tokenizer
    from distributed import init_distributed

    tok = train_tiny_tokenizer(tmp_path / "tokenizer.model")
    args = argparse.Namespace(
        data=SFT[:2],
        val_data=None,
        format=None,
        encoding="utf-8",
        seed=0,
        max_len=512,
        data_cache=None,
        out=tmp_path / "run",
    )
    digests = train_sft.data_digests(args)
    d = init_distributed()
    try:

        def lengths():
            train, val, summary = train_sft.rendered_data(args, digests, tok, d)
            return train.lengths, val.lengths, summary

        first = lengths()
        assert "rendering the data" in capsys.readouterr().out
        entries = sorted((tmp_path / "run" / "data-cache").iterdir())
        assert len(entries) == 1 and len(first[0]) > 40
        real = corpus.sft_data
        monkeypatch.setattr(corpus, "sft_data", lambda *a, **k: (_ for _ in ()).throw(AssertionError("read")))
        assert lengths() == first and "from the cache" in capsys.readouterr().out
        ids = entries[0] / "train" / "ids.int32"
        os.truncate(ids, ids.stat().st_size - 4)  # cut short: not whole, so rendered again
        with pytest.raises(AssertionError, match="read"):  # it tried to render again
            lengths()
        monkeypatch.setattr(corpus, "sft_data", real)
        assert lengths() == first and "rendering the data" in capsys.readouterr().out
        args.max_len = 256
        assert lengths() != first
        assert len(list((tmp_path / "run" / "data-cache").iterdir())) == 2  # no temporary left behind either
        args.max_len = 512
        shutil.rmtree(entries[0])
        (tmp_path / "run" / "data-cache" / f".{entries[0].name}.tmp-x" / "train").mkdir(parents=True)  # a kill's
        assert lengths() == first and "rendering the data" in capsys.readouterr().out
    finally:
        d.close()


def test_a_one_process_group_leaves_no_temporary_files():
    from distributed import init_distributed

    d = init_distributed()
    store = Path(d.store_dir)
    assert store.is_dir() and oct(store.stat().st_mode & 0o777) == "0o700"  # made safely, private
    d.close()
    assert not store.exists()


def test_resume_refuses_other_settings_and_data_order_does_not_matter(tmp_path, monkeypatch):
    """Issue 12: --resume took a changed --lr, --max-steps, --epochs, and a reordered --data moved
    validation conversations into training."""
    import train_sft

    torch.set_num_threads(1)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    args = [*COMMON, "--max-steps", "4", "--save-every", "2", "--eval-every", "2"]
    train_sft.main(["--data", *SFT, "--out", str(tmp_path / "whole"), *args])
    out = tmp_path / "resumed"
    with interrupted_at_step(monkeypatch, 3), pytest.raises(KeyboardInterrupt):
        train_sft.main(["--data", *SFT, "--out", str(out), *args])  # the state of step 2 is saved
    base = ["--data", *SFT, "--out", str(out), *args, "--resume"]
    with pytest.raises(SystemExit, match=r"other settings or data \(lr: 0.002 -> 0.001\)\. .*--allow-change lr"):
        train_sft.main(base + ["--lr", "1e-3"])
    with pytest.raises(
        SystemExit,
        match=r"\(seed: 0 -> 1\)\. Resume with the same ones, or start over with "
        r"--overwrite$",
    ):
        train_sft.main(base + ["--seed", "1"])
    changed = tmp_path / "changed.jsonl"
    changed.write_text(Path(SFT[0]).read_text(encoding="utf-8").replace("头", "脑"), encoding="utf-8")
    with pytest.raises(SystemExit, match=r"\(data: \["):
        train_sft.main(["--data", str(changed), *SFT[1:], *base[len(SFT) + 1 :]])
    # --data in another order is the same data: the same split and batches, so it resumes exactly.
    train_sft.main(["--data", *reversed(SFT), *base[len(SFT) + 1 :]])
    assert losses(out) == losses(tmp_path / "whole")
    # What --allow-change permits: a longer run from the saved step on.
    train_sft.main(base + ["--max-steps", "5", "--allow-change", "max-steps"])
    assert len(losses(out)) == 5 and losses(out)[:4] == losses(tmp_path / "whole")


def test_a_model_that_stopped_learning_is_named_and_never_kept_as_best(tmp_path, monkeypatch):
    """Issue 12: a run whose weights blew up (finite loss, gradient exactly 0 from step 2 on)
    kept that model as best/."""
    import train_sft

    real, calls = train_sft.train_step, []

    def flat_from_step_2(*args, **kwargs):
        calls.append(1)
        loss, norm = real(*args, **kwargs)
        return (loss, 0.0) if len(calls) >= 2 else (loss, norm)

    monkeypatch.setattr(train_sft, "train_step", flat_from_step_2)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    with pytest.raises(
        SystemExit,
        match=r"steps 2-4: the gradient is exactly zero \(loss flat at [0-9.]+\): the "
        r"model has stopped learning.*The last state: none, no state was saved yet",
    ):
        train_sft.main(["--data", *SFT, "--out", str(tmp_path), *COMMON, "--max-steps", "8", "--eval-every", "1"])
    kept = [r["step"] for r in records(tmp_path) if r.get("best")]
    assert kept and max(kept) < 2  # validations of steps 2 and 3 were not candidates for best/
    assert [r["step"] for r in records(tmp_path) if "loss" in r] == [1, 2, 3]


def test_a_full_disk_is_said_as_such(tmp_path, monkeypatch, capsys):
    """Issue 12: a full disk surfaced as "[enforce fail at inline_container.cc] unexpected pos"
    (torch's writer, wrapped again by torch.distributed.checkpoint) and a traceback."""
    import safety
    import train_sft
    import training
    from safety import run_main

    def full(*args, **kwargs):  # what torch.save reports when a write hits ENOSPC
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")

    monkeypatch.setattr(training.dcp, "save", full)
    monkeypatch.setattr(safety, "_free_bytes", lambda path: 0)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    assert (
        run_main(
            train_sft.main, ["--data", *SFT, "--out", str(tmp_path), *COMMON, "--max-steps", "2", "--save-every", "1"]
        )
        == 2
    )
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(f"error: {tmp_path / 'state.tmp'}: ENOSPC") and "enforce fail" not in err
    monkeypatch.setattr(safety, "_free_bytes", lambda path: 1 << 40)  # not a full disk: a bug, kept as it is
    with pytest.raises(RuntimeError, match="enforce fail"):
        run_main(
            train_sft.main,
            ["--data", *SFT, "--out", str(tmp_path), *COMMON, "--max-steps", "2", "--save-every", "1", "--overwrite"],
        )


def test_a_full_disk_under_the_data_cache_names_the_directory(tmp_path, monkeypatch, capsys):
    """Issue 44 item 3: a full disk while the data were rendered into --data-cache said
    "error: writing: ENOSPC, No space left on device", without the path."""
    import errno

    import train_sft
    from data import corpus
    from safety import run_main

    def full(*args, **kwargs):  # what a write() that hits ENOSPC raises: no file name
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(corpus, "write_corpus", full)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    cache = tmp_path / "cache"
    argv = ["--data", *SFT, "--out", str(tmp_path / "run"), *COMMON, "--max-steps", "1", "--data-cache", str(cache)]
    assert run_main(train_sft.main, argv) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(f"error: {cache}: ENOSPC, No space left on device"), err
    assert not list(cache.iterdir())  # nothing half-written is left


def test_a_log_without_a_progress_bar_gets_progress_lines(tmp_path, monkeypatch, capsys):
    """Issue 21: piped to a log, the main job's SFT stage said nothing for up to 45 s at a time
    (tqdm's bar is only redrawn in a terminal, and validations came every 10 steps)."""
    in_process(monkeypatch, tmp_path, "--max-steps", "3", "--log-every", "2", "--eval-every", "100")
    printed = capsys.readouterr().out
    assert re.search(r"^step 2/3: loss \d+\.\d{4}, lr [0-9.e+-]+, \d+ s so far, about \d+ s to go$", printed, re.M)
    assert "step 1/3:" not in printed and "step 3/3:" not in printed


def test_a_state_changed_since_it_was_saved_is_refused_naming_the_file(tmp_path, monkeypatch):
    """Issue 24: one flipped exponent bit in state/__0_0.distcp made a weight 1e37 and --resume
    wrote it into final/; a changed digit of "step" in trainer.json was accepted."""
    in_process(monkeypatch, tmp_path, "--max-steps", "2", "--save-every", "2")
    state = tmp_path / "state"
    resume = ["--max-steps", "3", "--allow-change", "max-steps", "--resume"]
    shard = next(state.glob("*.distcp"))
    data = bytearray(shard.read_bytes())
    original = bytes(data)
    data[len(data) // 2] ^= 0x40  # one bit, in the middle of the tensors
    shard.write_bytes(bytes(data))
    with pytest.raises(SystemExit, match=rf"^{shard}: not the file that was saved \(its digest differs\)"):
        in_process(monkeypatch, tmp_path, *resume)
    shard.write_bytes(original)
    trainer = state / "trainer.json"
    saved = trainer.read_text()
    trainer.write_text(saved.replace('"step": 2', '"step": 1'))
    with pytest.raises(SystemExit, match=rf"^{trainer}: its contents are not what was saved"):
        in_process(monkeypatch, tmp_path, *resume)
    trainer.write_text(saved[: len(saved) // 2])  # torn
    with pytest.raises(SystemExit, match=rf"^{trainer}: not a state this project wrote, or a damaged one"):
        in_process(monkeypatch, tmp_path, *resume)
    trainer.write_text(saved)
    in_process(monkeypatch, tmp_path, *resume)  # the state as saved resumes
    assert len(losses(tmp_path)) == 3


def test_duplicates_are_counted_and_a_lone_surrogate_is_named(tmp_path, monkeypatch, capsys):
    """Issue 24: 64 records of which 32 repeat others under new ids trained on 32 and said
    nothing; a lone surrogate (JSON "\\ud800") in a record was a sentencepiece RuntimeError
    with no file or line."""
    import train_sft
    from safety import run_main

    rows = [
        {
            "id": f"r{i}",
            "source": "t",
            "messages": [{"role": "user", "content": f"头痛{i}天了"}, {"role": "assistant", "content": f"多休息{i}。"}],
        }
        for i in range(32)
    ]
    rows += [dict(r, id=r["id"] + "-again") for r in rows]
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    train_sft.main(["--data", str(data), "--out", str(tmp_path / "run"), *COMMON, "--max-steps", "1"])
    assert "skipped 32 record(s): the same conversation as another" in capsys.readouterr().out
    bad = tmp_path / "bad.jsonl"
    lone = json.dumps(rows[1], ensure_ascii=False).replace("头", "\\ud800")  # as JSON spells a lone surrogate
    bad.write_text(json.dumps(rows[0]) + "\n" + lone + "\n", encoding="utf-8")
    assert run_main(train_sft.main, ["--data", str(bad), "--out", str(tmp_path / "bad"), *COMMON]) == 2
    assert capsys.readouterr().err.strip() == (
        f"error: {bad}:2: messages[0].content is not valid Unicode text (a lone surrogate at character 0)"
    )


def test_every_checkpoint_carries_a_model_card_with_its_runs_figures(tmp_path, monkeypatch):
    """Issue 26 item 4: a checkpoint said nothing of what it is, what it was trained on, how to
    load it or what it must not be used for."""
    from safety import file_digest

    torch.set_num_threads(1)
    in_process(monkeypatch, tmp_path, "--max-steps", "2", "--eval-every", "1")
    validations = [r for r in records(tmp_path) if "val_loss" in r and r["step"] > 0]
    best = min(validations, key=lambda r: r["val_loss"])
    for name in ("best", "final"):
        card = (tmp_path / name / "README.md").read_text(encoding="utf-8")
        assert (
            card.startswith(f"---\nlanguage: [zh]\nbase_model: {micro_model()}\n")
            and "# HuatuoGPT, SFT checkpoint" in card
        )
        assert all(f"`{Path(f).name}` (sha256 {file_digest(f)}…)" in card for f in SFT)
        assert f"validation loss {best['val_loss']:.4f}" in card
        assert "does not give medical advice" in card and "本模型不提供医疗建议" in card
        assert "apply_chat_template" in card and "vllm serve" in card
        assert "Here: tokenizer.json gives sentencepiece's ids (no two pieces share a score)." in card  # item 3
    assert f"at step {best['step']} (best/)" in (tmp_path / "best" / "README.md").read_text(encoding="utf-8")
    assert "step 2: the final weights" in (tmp_path / "final" / "README.md").read_text(encoding="utf-8")


def _children(pid: int) -> dict[int, int]:
    """The processes whose parent is `pid`, by their RANK (torchrun's workers)."""
    found = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if int(fields[1]) == pid:
                env = (stat.parent / "environ").read_bytes().split(b"\0")
                rank = next((int(e[5:]) for e in env if e.startswith(b"RANK=")), None)
                if rank is not None:
                    found[rank] = int(stat.parent.name)
        except (OSError, IndexError, ValueError):
            continue
    return found


def _start_and_wait(cmd, out, step):
    """torchrun `cmd`, returned once its metrics show `step`'s loss, written by this run (a
    resumed run first cuts an earlier run's lines after the step it resumes)."""
    start = time.time()
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=trainer_env(2), cwd=ROOT
    )
    metrics = out / "metrics.jsonl"
    while time.time() < start + 120 and proc.poll() is None:
        if (
            metrics.is_file()
            and metrics.stat().st_mtime > start
            and any(r.get("step") == step and "loss" in r for r in records(out))
        ):
            return proc
        time.sleep(0.02)
    raise AssertionError(f"the run ended or stalled before step {step}: {proc.communicate()[1][-2000:]}")


def _gone(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def test_a_preempted_killed_or_stuck_rank_ends_the_run_with_its_state_and_the_rerun_resumes_exactly(tmp_path):
    """Issue 33, items 1 and 3, on 2 gloo ranks under torchrun, one --out throughout.
    1. SIGTERM to rank 1 alone, then (the same command rerun) to torchrun's agent, which passes
       it on: each time every rank stops at the same step boundary (distributed.Preemption's
       all-reduce), the state of that step is on disk, OUT/preempted names it, the workers exit 75.
    3. The same command again (it resumes), then SIGKILL to rank 1: rank 0's next collective fails
       at once, and it ends with one line, no traceback; the state is still the last one saved.
       Then with --resume --dist-timeout 5, SIGSTOP to rank 1: rank 0 ends with the same line once
       its collective has waited 5 s (torchrun then kills the stopped rank after its own 30 s grace;
       here the test does).
    Last, --resume runs to the end, with the losses and final weights of an uninterrupted 2-rank
    run, to the bit."""
    args = ["--max-steps", "10", "--save-every", "100"]
    run(tmp_path / "whole", *args, nproc=2)
    out = tmp_path / "stopped"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        str(ROOT / "train_sft.py"),
        "--data",
        *SFT,
        "--out",
        str(out),
        *COMMON,
        *args,
    ]
    saved = 0
    for target in ("rank 1", "torchrun"):
        proc = _start_and_wait(cmd, out, saved + 2)
        os.kill(_children(proc.pid)[1] if target == "rank 1" else proc.pid, signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=120)
        assert proc.returncode != 0, (target, stdout[-2000:])
        # The workers exit 75: torchrun names that code when a worker ends the group; signalled
        # itself, it waits for its workers (which save first) and ends by the signal's exception.
        assert ("exitcode  : 75" if target == "rank 1" else "got signal: 15") in stderr, (target, stderr[-3000:])
        stopped_at = json.loads((out / "state" / "trainer.json").read_text())["step"]
        assert saved + 2 <= stopped_at < 10 and (out / "preempted").read_text().strip() == f"step {stopped_at}"
        assert f"stopped by {'another' if target == 'rank 1' else 'SIGTERM'}" in stdout, (target, stdout[-2000:])
        assert max(r["step"] for r in records(out) if "loss" in r) == stopped_at  # no step after the one saved
        saved = stopped_at
    ended = {}
    for fault, extra in ((signal.SIGKILL, []), (signal.SIGSTOP, ["--resume", "--dist-timeout", "5"])):
        proc = _start_and_wait(cmd + extra, out, saved + 2)
        ranks = _children(proc.pid)
        os.kill(ranks[1], fault)
        t0 = time.time()
        while not _gone(ranks[0]) and time.time() - t0 < 120:
            time.sleep(0.02)
        ended[fault.name] = time.time() - t0
        if fault == signal.SIGSTOP:
            os.kill(ranks[1], signal.SIGKILL)  # what torchrun does after its 30 s grace
        stdout, stderr = proc.communicate(timeout=120)
        assert proc.returncode != 0 and "error: rank 0: a collective failed" in stderr, (fault.name, stderr[-3000:])
        assert 'train_sft.py", line' not in stderr  # no worker's traceback (torchrun's own is its own)
        assert json.loads((out / "state" / "trainer.json").read_text())["step"] == saved  # the last complete state
    # At once, and after the 5 s timeout: far from --dist-timeout's default of 30 min either way, with
    # room for a loaded machine (issue 44: a test bounds what it checks, not how fast it runs).
    assert ended["SIGKILL"] < 60 and 5 <= ended["SIGSTOP"] < 60, ended
    proc = subprocess.run(cmd + ["--resume"], capture_output=True, text=True, env=trainer_env(2), cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not (out / "preempted").exists()
    assert losses(out) == losses(tmp_path / "whole")
    a, b = weights(tmp_path / "whole" / "final"), weights(out / "final")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    print("seconds to the end of rank 0:", ended)
