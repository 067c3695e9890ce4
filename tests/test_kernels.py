"""The numerical tests (marked `numerics`) run again under other CPU kernels, on every run of
the suite: a tolerance that holds on this machine's kernels must hold on any CPU's.

A tolerance fitted to one machine fails on another whose kernels sum in another order (an
AVX-512 machine rounded a batched matmul otherwise and moved fp32 log-probs by 1.4e-5 where
1e-5 was allowed). No machine can add instructions it lacks, but any x86 machine can take
them away, and MKL, torch's BLAS on x86, chooses its kernels by what it is allowed:

- `MKL_ENABLE_INSTRUCTIONS=AVX2`: on a CPU with AVX-512, the kernels of one without it.
  (MKL heeds it on Intel CPUs only: elsewhere this run repeats the native kernels.)
- `MKL_CBWR=COMPATIBLE`: MKL's SSE2 code path, the same on every x86 CPU and another
  blocking and summation order than any native one, AMD's included. The test checks that it
  really changes a matmul's bits here, so a no-op setting cannot pass for a proof.

Each set runs the marked tests in a pytest of its own, on one thread (another partition of
every threaded reduction). ATEN_CPU_CAPABILITY is left alone: below AVX-512 on an AVX-512
machine it breaks torch's own bf16 linears, and `default` triples the time.
"""

import os
import re
import subprocess
import sys

import conftest
import pytest
import torch
from conftest import ROOT

KERNEL_SETS = {"AVX2": {"MKL_ENABLE_INSTRUCTIONS": "AVX2"}, "SSE2": {"MKL_CBWR": "COMPATIBLE"}}
MKL_VARIABLES = ("MKL_ENABLE_INSTRUCTIONS", "MKL_CBWR")
MATMUL_DIGEST = (
    "import hashlib, torch; g = torch.Generator().manual_seed(0); "
    "a, b = torch.randn(256, 2048, generator=g), torch.randn(2048, 512, generator=g); "
    "print(hashlib.sha256((a @ b).numpy().tobytes()).hexdigest())"
)
MKL = "BLAS_INFO=mkl" in torch.__config__.show()


def environment(kernels: dict) -> dict:
    """This process's environment with only `kernels` chosen, one thread, and none of pytest's
    own variables (the run below is a session of its own, not an xdist worker)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_") and k not in MKL_VARIABLES}
    return dict(env, **kernels, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")


def matmul_digest(kernels: dict) -> str:
    proc = subprocess.run(
        [sys.executable, "-c", MATMUL_DIGEST],
        capture_output=True,
        text=True,
        env=environment(kernels),
        timeout=120,
        check=True,
    )
    return proc.stdout.strip()


@pytest.mark.skipif(not MKL, reason="torch's BLAS here is not MKL (not an x86 build): no kernel sets to choose")
@pytest.mark.parametrize("name", KERNEL_SETS)
def test_the_numerical_tests_hold_under_other_kernels(name, tmp_path):
    kernels = KERNEL_SETS[name]
    if name == "SSE2":
        assert matmul_digest(kernels) != matmul_digest({}), "MKL_CBWR=COMPATIBLE changed no bit of a matmul"
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        "-q",
        "-p",
        "no:xdist",
        "-p",
        "no:cacheprovider",
        "-m",
        "numerics",
        "--basetemp",
        str(tmp_path / "run"),
        str(ROOT / "tests"),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=environment(kernels), cwd=ROOT, timeout=600)
    summary = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""
    assert proc.returncode == 0, f"under {kernels}: {summary}\n{proc.stdout[-6000:]}\n{proc.stderr[-2000:]}"
    # Every marked test ran and passed, none skipped: as many as this run collected, when it
    # collected the whole suite (alone, this file sees none of them).
    passed = re.search(r"(\d+) passed", summary)
    assert passed and "skipped" not in summary, summary
    assert int(passed.group(1)) == conftest.NUMERICS or not conftest.NUMERICS, (summary, conftest.NUMERICS)
