"""What PPO needs from an FSDP2-sharded model, on 2 gloo ranks (tests/fsdp_worker.py): sliced
forwards through the root, sharded generation with ranks that finish at different times,
log-probs that equal a training forward's, the gradient memory the dry run predicts, and bf16
mixed precision, a PPO step equal to one computed by hand, the rollout kept gathered, and PPO's setup sending
each rank only its share. A hang (a rank leaving a collective early) fails by the timeout."""

import os
import subprocess
import sys

from conftest import ROOT

CHECKS = ["sliced_forward", "generation", "generation_one_rank_finishes_first", "generation_logprobs",
          "gradient_memory", "bf16_mixed_precision", "ppo_update", "rollout_gathered", "ppo_setup_share"]


def test_two_rank_fsdp_checks():
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(ROOT / "tests" / "fsdp_worker.py"), "sliced_forward", "generation", "gradient_memory",
           "bf16_mixed_precision", "ppo_update", "rollout_gathered", "ppo_setup_share"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=180)
    passed = [line.split()[1] for line in proc.stdout.splitlines() if line.startswith("ok ")]
    assert proc.returncode == 0 and passed == CHECKS, f"passed {passed}\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
