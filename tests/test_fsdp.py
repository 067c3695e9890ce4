"""What PPO needs from an FSDP2-sharded model, on 2 gloo ranks (tests/fsdp_worker.py): sliced
forwards through the root, sharded generation with ranks that finish at different times,
log-probs that equal a training forward's, the gradient memory the dry run predicts, bf16 mixed
precision, a PPO step equal to one computed by hand, the rollout kept gathered, PPO's setup
sending each rank only its share, the reward model sharded scoring as the whole one does, and
plan.py's steps on real tensors (test_plan.py compares them with the simulation). The worker
runs once a test run (conftest.two_rank_checks)."""

import pytest

pytestmark = pytest.mark.numerics  # run again under other kernel sets (tests/test_kernels.py)

CHECKS = [
    "sliced_forward",
    "generation",
    "generation_one_rank_finishes_first",
    "generation_logprobs",
    "gradient_memory",
    "bf16_mixed_precision",
    "ppo_update",
    "rollout_gathered",
    "ppo_setup_share",
    "frozen_bf16",
    "reward_sharded",
]


def test_two_rank_fsdp_checks(two_rank_checks):
    proc = two_rank_checks
    passed = [line.split()[1] for line in proc.stdout.splitlines() if line.startswith("ok ")]
    ours = [name for name in passed if name != "simulation_is_real"]  # test_plan.py's, when it runs
    assert proc.returncode == 0 and ours == CHECKS, f"passed {passed}\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
