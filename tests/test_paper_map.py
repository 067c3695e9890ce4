"""PAPER.md, the auditor's map from the paper to the code: every function, constant and test it
names exists, and the paper's numbers are the scripts' defaults."""

import ast
import re

import pytest
from conftest import ROOT

REF = re.compile(r"`((?:[\w-]+/)*[\w-]+\.py)::([\w.]+)`")


def defined_names(path) -> set[str]:
    """Top-level functions, classes and assigned names of a file, and Class.method."""
    names = set()
    for node in ast.parse(path.read_text(encoding="utf-8")).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
            if isinstance(node, ast.ClassDef):
                names |= {
                    f"{node.name}.{n.name}" for n in node.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))
                }
        elif isinstance(node, ast.Assign):
            names |= {t.id for t in node.targets if isinstance(t, ast.Name)}
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
    return names


def test_every_name_in_the_map_exists():
    text = (ROOT / "PAPER.md").read_text(encoding="utf-8")
    refs = REF.findall(text)
    assert len(refs) > 80  # the map is a map, not a stub
    missing = [f"{f}::{n}" for f, n in refs if not (ROOT / f).is_file() or n not in defined_names(ROOT / f)]
    assert not missing, f"PAPER.md names what does not exist: {missing}"
    # Every row of a table says where the statement is implemented and what checks it, or why not.
    for row in (
        line
        for line in text.splitlines()
        if line.startswith("| ") and not line.startswith("| paper") and not line.startswith("| choice")
    ):
        cells = [c.strip() for c in row.strip("|").split("|")]
        tests = cells[-1]
        assert "tests/" in tests or "not implemented" in row, f"a row of PAPER.md names no test: {row[:80]}"


def test_the_papers_numbers_are_the_defaults():
    import train_ppo
    import train_sft
    from data import template

    # App. E: "learning rate, batch size, and maximum context length to 5e-5, 128, and 2048 ...
    # trained for 3 epochs"
    assert (train_sft.LR, train_sft.BATCH_SIZE, train_sft.MAX_LEN, train_sft.EPOCHS) == (5e-5, 128, 2048, 3)
    assert template.MAX_LEN == 2048
    # App. E: "only update the parameters of the last two layers ... 16,000 steps ... learning
    # rate of 1e-6 ... rollout size of 64, chunk size of 8, and 4 PPO epochs ... initial kl 0.1"
    assert (train_ppo.TRAINABLE_BLOCKS, train_ppo.MAX_STEPS, train_ppo.LR) == (2, 16_000, 1e-6)
    assert (train_ppo.ROLLOUT_SIZE, train_ppo.CHUNK_SIZE, train_ppo.PPO_EPOCHS, train_ppo.INIT_KL_COEF) == (
        64,
        8,
        4,
        0.1,
    )


@pytest.mark.parametrize(
    "script, flag, value",
    [
        ("train_ppo.py", "--lr", "1e-06"),
        ("train_ppo.py", "--max-steps", "16000"),
        ("train_ppo.py", "--rollout-size", "64"),
        ("train_sft.py", "--lr", "5e-05"),
    ],
)
def test_the_command_lines_default_to_them(script, flag, value, capsys):
    """The constants are what a user gets: --help shows them as the defaults."""
    module = __import__(script.removesuffix(".py"))
    with pytest.raises(SystemExit):
        module.main(["--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert re.search(re.escape(flag) + r"[^-]*?default: " + re.escape(value), help_text), help_text[:2000]
