"""Every test starts from the same process state (conftest.fresh_process_state), as on a fresh
machine. The first test changes everything a test can change for the ones after it, the way
torch.compile raises the recursion limit or a trainer test takes one thread; the second, which
pytest runs after it, must not see any of it. (Issue 21: a suite that passed on a warm machine
failed on a fresh one because the compiled-decoding test left the recursion limit at 2,000.)"""

import os
import random
import sys
from pathlib import Path

import numpy as np
import torch

import conftest
from conftest import BASELINE, SEED


def test_changes_every_process_global_it_can(tmp_path):
    sys.setrecursionlimit(BASELINE["recursion_limit"] + 2345)
    torch.set_num_threads(1 if BASELINE["threads"] > 1 else 2)
    torch.set_default_dtype(torch.float64)
    os.chdir(tmp_path)
    os.environ["HUATUO_LEAKED"] = "1"
    os.environ["OMP_NUM_THREADS"] = "7"
    os.environ["RANK"] = "3"
    torch.manual_seed(12345), random.seed(12345), np.random.seed(12345)


def test_sees_none_of_it():
    assert sys.getrecursionlimit() == BASELINE["recursion_limit"]
    assert torch.get_num_threads() == BASELINE["threads"]
    assert torch.get_default_dtype() == BASELINE["dtype"] == torch.float32
    assert os.getcwd() == BASELINE["cwd"]
    assert "HUATUO_LEAKED" not in os.environ and "RANK" not in os.environ  # torchrun's RANK never leaks in
    assert os.environ.get("OMP_NUM_THREADS") == BASELINE["environ"].get("OMP_NUM_THREADS")
    # The global generators start from SEED: what a fresh generator seeded so draws first.
    assert torch.equal(torch.rand(3), torch.rand(3, generator=torch.Generator().manual_seed(SEED)))
    assert random.random() == random.Random(SEED).random()
    assert np.random.rand() == np.random.RandomState(SEED).rand()


def test_inductor_compiles_into_an_empty_cache_of_this_session():
    # Not the user's warm cache in /tmp/torchinductor_<user>: this session's own, which the
    # subprocesses the tests start inherit through the environment.
    session_cache = conftest.INDUCTOR_CACHE
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == session_cache and Path(session_cache).is_dir()
    from torch._inductor.runtime.cache_dir_utils import cache_dir

    assert cache_dir() == session_cache
