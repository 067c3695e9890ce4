"""The dry run's choice for every cell of docs/scale.md's table: SFT, the reward model and PPO
at Ziya-13B with the paper's settings, on GPUs of 24, 40, 80 and 141 GiB, 1, 8 and 64 of them
(plan.choose_lm, plan.choose_ppo: the time model ranks, the memory model prunes, the simulation
decides). Prints one markdown row a cell, and the FSDP-against-HSDP comparison at 64 GPUs.

    python bench/scale_choices.py sft rm     # ~10 min on one core
    python bench/scale_choices.py ppo        # ~15 min
    python bench/scale_choices.py hsdp sft rm   # 64 GPUs: FSDP over all against HSDP, ~5 min
"""

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import plan  # noqa: E402
import train_ppo  # noqa: E402
import train_rm  # noqa: E402
import train_sft  # noqa: E402
from pretrained import load_config  # noqa: E402

STEPS = {"sft": train_sft.train_step, "rm": train_rm.train_step}  # what each trainer hands the planner
GPUS = (1, 8, 64)
MEMORY = (24, 40, 80, 141)


def cell(ranked, gpu_gb, world, command) -> tuple[str, object]:
    lines = []
    chosen = plan.print_choice(ranked, gpu_gb=gpu_gb, world=world, command=command, log=lines.append)
    simulated = sum(c.simulated is not None for c in ranked)
    if chosen is None:
        c = min(ranked, key=lambda c: c.simulated or c.modelled)
        held = f"{plan.size(c.simulated)} simulated" if c.simulated else f"{plan.size(c.modelled)} by the memory model"
        return f"nothing fits (the least: {held}; {simulated} simulated)", None
    return (
        f"`{chosen.command_flags() or '(defaults)'}`: {plan.size(chosen.simulated)}, {plan.hours(chosen.seconds)} "
        f"({simulated} simulated)"
    ), chosen


def main(kinds):
    config = load_config("ziya-13b")
    for kind in kinds:
        for world in GPUS:
            for gb in MEMORY:
                start = time.time()
                if kind == "ppo":
                    rounds = -(
                        -train_ppo.MAX_STEPS // (train_ppo.PPO_EPOCHS * train_ppo.ROLLOUT_SIZE // train_ppo.BATCH_SIZE)
                    )
                    ranked = plan.choose_ppo(
                        config,
                        train_ppo.plan_parts(),
                        world=world,
                        gpu_gb=gb,
                        rounds=rounds,
                        rollout_size=train_ppo.ROLLOUT_SIZE,
                        batch_size=train_ppo.BATCH_SIZE,
                        ppo_epochs=train_ppo.PPO_EPOCHS,
                        prompt_len=1024,  # --plan-prompt-tokens
                        new_tokens=train_ppo.MAX_NEW_TOKENS,
                        trainable_blocks=train_ppo.TRAINABLE_BLOCKS,
                        score_batch_size=train_ppo.SCORE_BATCH_SIZE,
                        bottom_batch_size=train_ppo.BOTTOM_BATCH_SIZE,
                        defaults=plan.layout_defaults(train_ppo.arg_parser()),
                    )
                    if not ranked:
                        print(
                            f"| ppo | {world} | {gb} | the paper's minibatch of {train_ppo.BATCH_SIZE} does not "
                            f"split over {world} ranks |",
                            flush=True,
                        )
                        continue
                    text, chosen = cell(ranked, gb, world, "train_ppo.py")
                else:
                    batch = train_sft.BATCH_SIZE if kind == "sft" else train_rm.BATCH_SIZE
                    items = plan.TABLE3_CONVERSATIONS if kind == "sft" else batch * 100
                    epochs = train_sft.EPOCHS if kind == "sft" else train_rm.EPOCHS
                    ranked = plan.choose_lm(
                        config,
                        kind,
                        STEPS[kind],
                        world=world,
                        gpu_gb=gb,
                        batch=batch,
                        seq=train_sft.MAX_LEN if kind == "sft" else train_rm.MAX_LEN,
                        steps=epochs * items // batch,
                        mean_tokens=1024,
                        defaults=plan.layout_defaults((train_sft if kind == "sft" else train_rm).arg_parser()),
                    )
                    text, chosen = cell(ranked, gb, world, f"train_{kind}.py")
                print(f"| {kind} | {world} | {gb} | {text} | {time.time() - start:.0f} s |", flush=True)


def fsdp_or_hsdp(kinds, world: int = 64):
    """At `world` GPUs, the fastest layout that fits with the model sharded over all of them
    (FSDP) and over each node's 8 (HSDP, --shard-ranks 8), at every memory size."""
    config = load_config("ziya-13b")
    for kind in kinds:
        batch = train_sft.BATCH_SIZE if kind == "sft" else train_rm.BATCH_SIZE
        items = plan.TABLE3_CONVERSATIONS if kind == "sft" else batch * 100
        epochs = train_sft.EPOCHS if kind == "sft" else train_rm.EPOCHS
        for gb in MEMORY:
            texts = []
            for shards in ([None], [plan.GPUS_PER_NODE]):
                ranked = plan.choose_lm(
                    config,
                    kind,
                    STEPS[kind],
                    world=world,
                    gpu_gb=gb,
                    batch=batch,
                    seq=train_sft.MAX_LEN if kind == "sft" else train_rm.MAX_LEN,
                    steps=epochs * items // batch,
                    mean_tokens=1024,
                    defaults=plan.layout_defaults((train_sft if kind == "sft" else train_rm).arg_parser()),
                    shards=shards,
                )
                texts.append(cell(ranked, gb, world, f"train_{kind}.py")[0])
            print(f"| {kind} | {gb} | {' | '.join(texts)} |", flush=True)


if __name__ == "__main__":
    if sys.argv[1:2] == ["hsdp"]:
        sys.exit(fsdp_or_hsdp(sys.argv[2:] or ["sft", "rm"]))
    main(sys.argv[1:] or ["sft", "rm", "ppo"])
