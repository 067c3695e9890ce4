"""Shared fixtures: tiny random LLaMAs built twice (ours and transformers') with the same weights;
and the rule that every test starts from the same process state, as on a fresh machine."""

import fcntl
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from model import ModelConfig, Transformer  # noqa: E402
from pretrained import config_from_hf, save_model  # noqa: E402

# -- a fresh machine, every run ---------------------------------------------------------------------
# A machine that has run the suite before keeps inductor's compiled kernels on disk; a fresh one
# compiles them, and compiling changes process state (inductor raises the recursion limit to
# 2,000), so a suite that passes warm can fail cold. Every session gets an empty cache of its
# own, the subprocesses it starts included (they inherit the environment), and removes it at
# the end. (pytest_configure: a worker script that imports this module for its helpers keeps
# its own environment, torchrun's RANK included.)
INDUCTOR_CACHE = None
# The process-global state a test can change and another could depend on, as the session
# starts; `fresh_process_state` gives each test exactly this and puts it back afterwards.
BASELINE = {}
SEED = 0  # every test's global RNGs (torch, random, numpy) start here


def pytest_configure(config):
    global INDUCTOR_CACHE
    config.addinivalue_line(
        "markers",
        "numerics: a numerical test that tests/test_kernels.py runs again under "
        "other CPU kernel sets (its tolerances must hold on any CPU)",
    )
    INDUCTOR_CACHE = tempfile.mkdtemp(prefix="huatuo-tests-inductor-")
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = INDUCTOR_CACHE
    # Variables that change what the code under test does, when a developer's shell has them
    # set: torchrun's (init_distributed would join a process group that is not there) and the
    # API keys (a server that asks for a key, a client that sends a real one).
    for name in [n for n in os.environ if n.startswith(("TORCHELASTIC_", "OPENAI_"))] + [
        "RANK",
        "WORLD_SIZE",
        "LOCAL_RANK",
        "LOCAL_WORLD_SIZE",
        "GROUP_RANK",
        "MASTER_ADDR",
        "MASTER_PORT",
        "SERVE_API_KEY",
    ]:
        os.environ.pop(name, None)
    BASELINE.update(
        recursion_limit=sys.getrecursionlimit(),
        threads=torch.get_num_threads(),
        dtype=torch.get_default_dtype(),
        cwd=os.getcwd(),
        environ=dict(os.environ),
    )


NUMERICS = 0  # how many tests of the whole suite are marked `numerics` (tests/test_kernels.py)


@pytest.hookimpl(tryfirst=True)  # before -m and -k deselect any
def pytest_collection_modifyitems(config, items):
    global NUMERICS
    NUMERICS = sum(1 for item in items if item.get_closest_marker("numerics"))


def pytest_terminal_summary(terminalreporter):
    """Why tests were skipped, a line a reason (`-q` would only count them): how to enable the
    browser tests where there is no browser, for one."""
    reasons = [
        r.longrepr[2].removeprefix("Skipped: ")
        for r in terminalreporter.stats.get("skipped", [])
        if isinstance(r.longrepr, tuple)
    ]
    for reason in dict.fromkeys(reasons):
        terminalreporter.write_line(f"skipped ({reasons.count(reason)}): {reason}")


def pytest_sessionfinish(session, exitstatus):
    if INDUCTOR_CACHE:
        shutil.rmtree(INDUCTOR_CACHE, ignore_errors=True)
    if MICRO:
        shutil.rmtree(MICRO.parent, ignore_errors=True)


MICRO = None


def micro_model() -> Path:
    """The model of the trainer runs that show a mechanism (1 rank = 2 ranks, exact resume, the
    guards): `tiny`'s layout at a tenth of its compute — 2 blocks of width 64, grouped-query
    attention, an embedding table larger than its tokenizer — randomly initialised (seed 0), with
    the embedded default's tokenizer (training.train_tiny_tokenizer). An HF-format
    directory, written once a session: `--model MICRO` runs three times faster than `--model tiny`."""
    global MICRO
    if MICRO is None:
        from training import train_tiny_tokenizer

        out = Path(tempfile.mkdtemp(prefix="huatuo-tests-micro-")) / "micro"
        out.mkdir()
        train_tiny_tokenizer(out.parent / "tokenizer.model")
        config = ModelConfig(
            vocab_size=2304,
            hidden_size=64,
            intermediate_size=176,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=2048,
        )
        save_model(Transformer.from_config(config, seed=0), out, tokenizer=out.parent / "tokenizer.model")
        MICRO = out
    return MICRO


@pytest.fixture(autouse=True)
def fresh_process_state():
    """Each test alone, in any order: the recursion limit, torch's thread count and default
    dtype, the working directory and the environment as the session started, the global RNGs
    seeded with SEED; whatever the test changes of them is put back when it ends."""
    restore_process_state()
    yield
    restore_process_state()


def restore_process_state():
    sys.setrecursionlimit(BASELINE["recursion_limit"])
    torch.set_num_threads(BASELINE["threads"])
    torch.set_default_dtype(BASELINE["dtype"])
    os.chdir(BASELINE["cwd"])
    for name in set(os.environ) - set(BASELINE["environ"]):
        if not name.startswith("PYTEST_"):  # pytest's own, PYTEST_CURRENT_TEST
            del os.environ[name]
    for name, value in BASELINE["environ"].items():
        if os.environ.get(name) != value:
            os.environ[name] = value
    torch.manual_seed(SEED)
    random.seed(SEED)
    np.random.seed(SEED)


def popen_as_from_a_terminal(cmd: list[str], **kw) -> subprocess.Popen:
    """subprocess.Popen(cmd, **kw) with SIGINT at its default action, as a terminal's foreground
    command has it, for a test that sends Ctrl-C. A shell starts a background command (`pytest
    ... &` in a script) with SIGINT ignored, every child inherits that, and Python then never
    installs its KeyboardInterrupt: the test would signal a program that cannot hear it."""
    return subprocess.Popen(cmd, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL), **kw)


def trainer_env(nproc: int = 1) -> dict:
    """The environment for a trainer run as a subprocess: a one-process run takes both cores
    of the two-core test machine, each rank of a two-rank run one."""
    return dict(os.environ, OMP_NUM_THREADS="2" if nproc == 1 else "1", PYTHONWARNINGS="ignore")


def hf_config(**overrides):
    from transformers import LlamaConfig

    kw = dict(
        vocab_size=101,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=256,
        rope_theta=500.0,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    kw.update(overrides)
    return LlamaConfig(**kw)


def sharpen_(model, seed=0):
    """Weights large enough that attention is peaked and depends strongly on position.

    With the default 0.02 init every attention row is nearly uniform, which hides RoPE and
    masking errors; q/k at std 0.4 make the scores span tens of nats.
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(torch.rand(p.shape, generator=gen) + 0.5)
            elif "q_proj" in name or "k_proj" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.4)
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.15)
    return model


def make_pair(dtype=torch.float32, **overrides):
    """(ours, transformers') LlamaForCausalLM with identical, sharp random weights, in eval mode.

    dtype=torch.float64 for exactness checks: fp32 results of two differently ordered but
    equivalent computations differ by ~1e-6 relative, and by how much depends on the CPU's
    kernels; in fp64 the same comparison holds to ~1e-14 on any machine."""
    from transformers import LlamaForCausalLM

    cfg = hf_config(**overrides)
    hf = sharpen_(LlamaForCausalLM(cfg)).eval()
    ours = Transformer(config_from_hf(cfg.to_dict()))
    missing, unexpected = ours.load_state_dict(
        {k.removeprefix("model."): v for k, v in hf.state_dict().items()}, strict=False
    )
    assert not unexpected and set(missing) <= ({"lm_head.weight"} if cfg.tie_word_embeddings else set())
    return ours.to(dtype).eval(), hf.to(dtype)


@pytest.fixture
def pair():
    return make_pair()


@pytest.fixture
def small_model():
    """One of ours alone, sharp, for tests that need no reference."""
    cfg = ModelConfig(
        vocab_size=101,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        rope_theta=500.0,
    )
    return sharpen_(Transformer(cfg)).eval()


@pytest.fixture(scope="session")
def two_rank_checks(tmp_path_factory, request):
    """tests/fsdp_worker.py's checks under torchrun on 2 gloo ranks, run once a test run for the
    tests that read them (test_fsdp.py, test_plan.py), whichever xdist worker asks first: the
    finished process's return code and output text. A hang (a rank leaving a collective early)
    fails by the timeout. The simulation's real run (a third of the time) only when a test of
    test_plan.py is in the run."""
    import subprocess

    plan = any(item.path.name == "test_plan.py" for item in request.session.items)

    def run():
        checks = [
            "sliced_forward",
            "generation",
            "gradient_memory",
            "bf16_mixed_precision",
            "ppo_update",
            "rollout_gathered",
            "ppo_setup_share",
            "frozen_bf16",
            "reward_sharded",
        ] + ["simulation_is_real"] * plan
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
            str(ROOT / "tests" / "fsdp_worker.py"),
            *checks,
        ]
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
        return {"returncode": proc.returncode, "stdout": proc.stdout, "stderr": proc.stderr}

    return SimpleNamespace(**once_a_run(tmp_path_factory, "two_rank_checks", run))


def two_nodes(script: str, *per_node: list[str], timeout: float = 300):
    """Two "nodes" on this machine: `torchrun --nnodes 2 --nproc-per-node 1` started twice, as on
    two hosts, meeting through a c10d rendezvous on loopback, which gives each its node rank
    (and so its global rank). per_node: each node's arguments to `script` (their --out may
    differ, as two local disks do). Returns both finished processes."""
    import socket
    import subprocess

    with socket.socket() as s:  # a port free now; the first node to start hosts the rendezvous there
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    launcher = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes",
        "2",
        "--nproc-per-node",
        "1",
        "--rdzv-backend",
        "c10d",
        "--rdzv-endpoint",
        f"127.0.0.1:{port}",
        "--rdzv-id",
        "two-nodes",
    ]
    procs = [
        subprocess.Popen(
            launcher + [str(ROOT / script), *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=trainer_env(2),
            cwd=ROOT,
        )
        for args in per_node
    ]
    outputs = [p.communicate(timeout=timeout) for p in procs]
    return [subprocess.CompletedProcess(p.args, p.returncode, o, e) for p, (o, e) in zip(procs, outputs)]


def once_a_run(tmp_path_factory, name: str, make):
    """make()'s JSON-able result, made by one process of the test run: under pytest-xdist every
    worker's base temporary directory lies in the run's own, where the first worker to ask
    writes the result under a lock and the others read it. (xdist's --dist loadgroup would send
    the readers to one worker instead, but pytest 9.2 broke it: pytest-xdist issue #1386.)"""
    base = tmp_path_factory.getbasetemp()
    shared = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
    with open(shared / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        done = shared / f"{name}.json"
        if not done.is_file():
            done.write_text(json.dumps(make()), encoding="utf-8")
        return json.loads(done.read_text(encoding="utf-8"))


CORPUS = [
    "我最近三天一直头痛，晚上睡不好，需要去医院吗？",
    "头痛伴随发热和颈部僵硬时，应尽快就医，排除脑膜炎。",
    "高血压患者应当低盐饮食，每天食盐不超过5克，并规律服药。",
    "糖尿病的典型症状是多饮、多尿、多食和体重下降。",
    "Aspirin 100mg qd, 监测血压 140/90 mmHg。",
    "孩子发烧38.5度，可以先物理降温，超过38.5度可用对乙酰氨基酚。",
    "咳嗽两周以上，伴有低热盗汗，需要排查肺结核。",
    "胃痛、反酸、烧心，可能是胃食管反流病，建议少食多餐。",
] * 20


@pytest.fixture(scope="session")
def tokenizer_file(tmp_path_factory):
    from tokenizer import train_tokenizer

    out = tmp_path_factory.mktemp("tok") / "tokenizer.model"
    train_tokenizer(CORPUS, out, vocab_size=400)
    return out


def poison_update(monkeypatch, trainer, at: int):
    """The `at`-th optimizer step of a run of `trainer` (train_sft, train_rm or train_ppo, run in
    this process) leaves a NaN in the weights, as an update from a finite gradient can (too high
    an --lr): its make_optimizer's optimizer, with that step poisoned."""
    real = trainer.make_optimizer

    def make_optimizer(model, *args, **kwargs):
        opt, steps = real(model, *args, **kwargs), []
        step = opt.step

        def poisoned(*a, **kw):
            out = step(*a, **kw)
            steps.append(1)
            if len(steps) == at:
                with torch.no_grad():
                    p = next(p for p in model.parameters() if p.requires_grad)
                    (p.to_local() if hasattr(p, "to_local") else p).view(-1)[0] = float("nan")
            return out

        opt.step = poisoned
        return opt

    monkeypatch.setattr(trainer, "make_optimizer", make_optimizer)
