"""The embedded default, end to end on a laptop CPU: no downloads, no API key.

    python quickstart.py [--out runs/quickstart]

1. supervised fine-tuning (train_sft.py) of the `tiny` LLaMA on the conversations shipped in
   data/sft/, with the HuatuoGPT chat template and the loss on the doctor's replies only; the
   tokenizer is trained on the shipped text first. The validation loss is printed as it falls
   and the best weights are kept, as in the paper (App. E);
2. samples k responses per prompt from the SFT model (train_rm.py sample) — the file that
   distill.py score would have ChatGPT rate against the doctor's answers;
3. trains the reward model from the SFT model (train_rm.py) on the preference pairs shipped in
   data/preference/ (standing in for the API's ratings), printing the held-out accuracy;
4. RLMF (train_ppo.py): PPO from the SFT model against that reward model, with the KL penalty
   against the SFT policy, only the last two blocks trained, printing the mean score and KL per
   round (a few rounds of 16 experiences: enough to watch it run, not to improve the model);
5. loads the SFT and the PPO checkpoints (Hugging Face layout) and answers a question with each.

Each stage is a script of its own that also runs at full scale (see README.md).
"""

import argparse
import json
import sys
from pathlib import Path

import train_ppo
import train_rm
import train_sft
from data.schema import run_main
from evaluate import Doctor

ROOT = Path(__file__).resolve().parent


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "quickstart")
    p.add_argument("--epochs", type=int, default=6)
    args = p.parse_args(argv)

    print("[1/5] supervised fine-tuning of the tiny model on data/sft/")
    sft = args.out / "sft"
    train_sft.main(["--model", "tiny", "--data", *sorted(str(f) for f in (ROOT / "data" / "sft").glob("*.jsonl")),
                    "--out", str(sft), "--overwrite", "--batch-size", "8", "--lr", "2e-3", "--epochs", str(args.epochs),
                    "--eval-every", "10", "--save-every", "1000"])
    vals = [r["val_loss"] for r in map(json.loads, (sft / "metrics.jsonl").read_text().splitlines()) if "val_loss" in r]
    print("      validation loss: " + " -> ".join(f"{v:.3f}" for v in vals))

    print("[2/5] sampling 2 responses for each of 8 prompts from the SFT model")
    for stale in ("samples.jsonl", "samples.setup.json"):  # `sample` resumes, and refuses another model's file
        (args.out / stale).unlink(missing_ok=True)
    train_rm.main(["sample", "--model", str(sft / "best"), "--data", str(ROOT / "data" / "sft" / "doctor_qa.jsonl"),
                   "--out", str(args.out / "samples.jsonl"), "-k", "2", "--limit", "8", "--max-new-tokens", "48"])
    print("      (with an API key, `python distill.py score --input samples.jsonl` rates them; here the\n"
          "       shipped preference pairs stand in for those ratings)")
    print("[3/5] reward model from the SFT model on data/preference/")
    rm = args.out / "rm"
    train_rm.main(["--model", str(sft / "best"), "--data", str(ROOT / "data" / "preference" / "preference_pairs.jsonl"),
                   "--out", str(rm), "--overwrite", "--batch-size", "4", "--lr", "1e-3", "--epochs", "3", "--eval-every", "8",
                   "--save-every", "1000"])
    accs = [r["val_accuracy"] for r in map(json.loads, (rm / "metrics.jsonl").read_text().splitlines())
            if "val_accuracy" in r]
    print("      held-out pairwise accuracy: " + " -> ".join(f"{a:.3f}" for a in accs) + " (chance 0.5)")

    print("[4/5] PPO from the SFT model against the reward model (RLMF)")
    ppo = args.out / "ppo"
    train_ppo.main(["--policy", str(sft / "best"), "--reward", str(rm / "best"), "--data",
                    *sorted(str(f) for f in (ROOT / "data" / "sft").glob("*.jsonl")), "--exclude",
                    str(ROOT / "data" / "preference" / "preference_pairs.jsonl"), "--out", str(ppo), "--overwrite",
                    "--max-steps", "32", "--rollout-size", "16", "--chunk-size", "8", "--batch-size", "8",
                    "--max-new-tokens", "48", "--lr", "1e-4", "--save-every", "1000"])
    rounds = [json.loads(line) for line in (ppo / "metrics.jsonl").read_text().splitlines()]
    print("      mean score: " + " -> ".join(f"{r['score']:.3f}" for r in rounds))
    print("      mean KL to the SFT policy (nats per response): " + " -> ".join(f"{r['kl']:.3f}" for r in rounds))

    question = "医生您好，我这两天发烧，嗓子疼。"
    print("[5/5] the best SFT checkpoint and the PPO policy answer:\n")
    for name, path in (("SFT", sft / "best"), ("PPO", ppo / "final")):
        doctor = Doctor(path, max_new_tokens=100, temperature=0.7, top_p=0.9, repetition_penalty=1.1)
        print(f"<病人>：{question}\n<HuatuoGPT {name}>：{doctor.reply([[{'role': 'user', 'content': question}]])[0]}\n")


if __name__ == "__main__":
    sys.exit(run_main(main))
