"""Every numeric flag of every command is checked at parse time (issue 35 item 1): a value out of
its range is one line and exit 2, never a traceback, a hang or a table of nonsense; the dry run
refuses what the real run would refuse; LoRA's flags are checked against the model before any
data is read."""

import argparse
import importlib
import time

import pytest
from conftest import ROOT

from safety import run_main

# Each command's main, and the argv prefixes that reach each of its parsers.
COMMANDS = {
    "train_sft": [[]],
    "train_rm": [[], ["sample"], ["score"]],
    "train_ppo": [[]],
    "distill": [[]],
    "evaluate": [[]],
    "generate": [[]],
    "serve": [[]],
    "convert": [[]],
    "quickstart": [[]],
    "tokenizer": [[]],
    "chat": [[]],
    "data.__main__": [[]],
}
ANY_INTEGER = {"--seed"}  # a seed may be any integer, negative ones included
SFT_DRY = ["train_sft", "--model", "ziya-13b", "--dry-run"]
PPO_DRY = ["train_ppo", "--policy", "ziya-13b", "--dry-run"]


class Captured(Exception):
    pass


def parsers():
    """(command, parser) for every parser of every command, sub-commands' included, each caught
    as its main builds it (parse_args raises before anything runs)."""
    found = []
    real = argparse.ArgumentParser.parse_args

    def catch(self, *a, **k):
        found.append(self)
        raise Captured

    argparse.ArgumentParser.parse_args = catch
    try:
        for name, prefixes in COMMANDS.items():
            module = importlib.import_module(name)
            for prefix in prefixes:
                with pytest.raises(Captured):
                    module.main([*prefix, "--help"])
                parser = found.pop()
                todo = [(f"{name} {' '.join(prefix)}".strip(), parser)]
                while todo:
                    label, p = todo.pop()
                    found.append((label, p))
                    for action in p._actions:
                        if isinstance(action, argparse._SubParsersAction):
                            todo += [(f"{label} {sub}", sp) for sub, sp in action.choices.items()]
    finally:
        argparse.ArgumentParser.parse_args = real
    return found


def test_every_numeric_flag_of_every_command_has_its_range():
    """No flag takes a bare int or float: each has a type from safety.number, and "nan" or a
    value below its bound is argparse's one line and exit 2, naming the flag."""
    unchecked, checked = [], 0
    for label, parser in parsers():
        for action in parser._actions:
            flag = max(action.option_strings, key=len, default=action.dest)
            if action.type in (int, float) and flag not in ANY_INTEGER:
                unchecked.append(f"{label} {flag}")
            bound = getattr(action.type, "bounds", None)
            if bound is None:
                continue
            checked += 1
            for bad in ("nan", str(bound[0] - 1) if bound[0] is not None else "inf"):
                with pytest.raises(SystemExit) as e:
                    parser.parse_args([*action.option_strings[:1], bad] if action.option_strings else [bad])
                assert e.value.code == 2, (label, flag, bad)
    assert not unchecked, unchecked
    assert checked > 80


@pytest.mark.parametrize(
    "argv, says",
    [
        ([*SFT_DRY, "--simulate", "--world-size", "0"], "--world-size: 0 is out of range"),
        ([*SFT_DRY, "--simulate", "--world-size", "-1"], "--world-size: -1 is out of range"),
        ([*SFT_DRY, "--mfu", "0"], "--mfu: 0 is out of range"),
        ([*SFT_DRY, "--epochs", "0"], "--epochs: 0 is out of range"),
        ([*SFT_DRY, "--batch-size", "0"], "--batch-size: 0 is out of range"),
        ([*SFT_DRY, "--simulate", "--simulate-micro-batches", "0"], "--simulate-micro-batches: 0 is out of range"),
        ([*PPO_DRY, "--world-size", "0"], "--world-size: 0 is out of range"),
        (
            [*SFT_DRY, "--simulate", "--world-size", "1000000"],
            "--batch-size 128 is not a multiple of --micro-batch-size 1",
        ),
        (  # divisible, yet a simulation of a million fake ranks runs for hours: refused at once
            [*SFT_DRY, "--simulate", "--world-size", "1000000", "--batch-size", "1000000"],
            "--simulate --world-size 1000000: at most 1024 fake ranks",
        ),
        (
            [*PPO_DRY, "--simulate", "--world-size", "2048", "--rollout-size", "2048", "--batch-size", "2048"],
            "--simulate --world-size 2048: at most 1024 fake ranks",
        ),
        ([*SFT_DRY, "--lora-rank", "100000"], "--lora-rank 100000: must be between 1 and 5120"),
        ([*SFT_DRY, "--lora-rank", "-1"], "--lora-rank: -1 is out of range"),
        ([*SFT_DRY, "--lora-rank", "8", "--lora-targets", "nonexistent"], "--lora-targets nonexistent: no such linear"),
        ([*SFT_DRY, "--lora-alpha", "nan"], "--lora-alpha: nan is not a number > 0"),
        ([*SFT_DRY, "--gpu-memory-gb", "-5"], "--gpu-memory-gb: -5 is out of range"),
        ([*SFT_DRY, "--mfu", "2"], "--mfu: 2 is out of range"),
        ([*SFT_DRY, "--mfu", "nan"], "--mfu: nan is not a number"),
        ([*SFT_DRY, "--plan-items", "-5"], "--plan-items: -5 is out of range"),
        ([*SFT_DRY, "--plan-tokens-per-item", "0"], "--plan-tokens-per-item: 0 is out of range"),
        (["train_rm", "--model", "ziya-13b", "--dry-run", "--world-size", "-4"], "--world-size: -4 is out of range"),
        ([*SFT_DRY, "--peak-tflops", "0"], "--peak-tflops: 0 is out of range"),
        ([*SFT_DRY, "--hbm-tbps", "-1"], "--hbm-tbps: -1 is out of range"),
        ([*SFT_DRY, "--plan-items", "0"], "--plan-items: 0 is out of range"),
        ([*SFT_DRY, "--max-len", "0"], "--max-len: 0 is out of range"),
        ([*SFT_DRY, "--simulate-micro-batches", "-2"], "--simulate-micro-batches: -2 is out of range"),
        (
            [*SFT_DRY, "--micro-batch-size", "3", "--batch-size", "128", "--world-size", "8"],
            "--batch-size 128 is not a multiple of --micro-batch-size 3 x 8 ranks",
        ),
        ([*PPO_DRY, "--world-size", "3"], "is not a multiple of --micro-batch-size 1 x 3 ranks"),
        ([*PPO_DRY, "--rollout-size", "100"], "--rollout-size 100 must be a multiple of --batch-size"),
    ],
)
def test_a_flag_out_of_range_or_a_split_the_run_would_refuse_is_one_line_and_exit_2(argv, says, capsys):
    """Each row of issue 35's table, which crashed, hung or planned nonsense."""
    module = importlib.import_module(argv[0])
    start = time.monotonic()
    try:
        code = run_main(module.main, argv[1:])
    except SystemExit as e:  # argparse's own exit
        code = e.code
    err = capsys.readouterr().err
    assert code == 2 and says in err, err
    assert "Traceback" not in err and len([line for line in err.splitlines() if "error:" in line]) == 1
    assert time.monotonic() - start < 60  # before any expensive work (a bound that leaves room for a loaded machine)


@pytest.mark.parametrize(
    "flags, says",
    [
        (["--lora-rank", "100000"], "--lora-rank 100000: must be between 1 and"),
        (["--lora-rank", "4", "--lora-targets", "q_proj", "nonexistent"], "--lora-targets nonexistent: no such"),
    ],
)
def test_lora_flags_that_do_not_fit_the_model_stop_a_real_run_before_its_data_is_read(
    tmp_path, capsys, monkeypatch, flags, says
):
    """A real run of the embedded model (--lora-rank 100000 grew to 5 GB; -1 failed after the
    data loaded): one line, before any data file is opened (the reader here would fail)."""
    import data.corpus
    import train_rm
    import train_sft

    monkeypatch.setattr(data.corpus, "sft_data", lambda *a, **k: pytest.fail("the data was read"))
    monkeypatch.setattr(train_rm, "read", lambda *a, **k: pytest.fail("the data was read"))
    sft = [str(p) for p in sorted((ROOT / "data" / "sft").glob("*.jsonl"))]
    pairs = [str(p) for p in sorted((ROOT / "data" / "preference").glob("*.jsonl"))]
    for main, files, out in ((train_sft.main, sft, "sft"), (train_rm.main, pairs, "rm")):
        code = run_main(main, ["--model", "tiny", "--data", *files, "--out", str(tmp_path / out), *flags])
        err = capsys.readouterr().err
        assert code == 2 and says in err and "Traceback" not in err, err
