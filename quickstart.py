"""The main job: the whole paper on the embedded default, on a laptop CPU, with no downloads and
no API key, in a few minutes, ending with a report.

    python quickstart.py [--out runs/quickstart] [--overwrite]

The stages, in the paper's order, each a script of its own that also runs at full scale
(README.md):
1. supervised fine-tuning (train_sft.py, §3.1) of the `tiny` LLaMA on the conversations shipped
   in data/sft/, with the HuatuoGPT template and the loss on the doctor's replies only; the
   tokenizer is trained on the shipped text first; the best weights by validation loss are kept;
2. k responses per prompt sampled from the SFT model (train_rm.py sample, §3.2): the file that
   distill.py score has ChatGPT rate against the doctor's answers when there is an API key;
3. the reward model (train_rm.py, §3.2) from the SFT model, on the preference pairs shipped in
   data/preference/ (standing in for those ratings);
4. RLMF (train_ppo.py, §3.2): PPO from the SFT model against the reward model, with the KL
   penalty against the SFT policy and only the last two blocks trained (a few rounds: enough to
   watch every part work, not to make a better doctor);
5. the evaluation (evaluate.py, §4) of the SFT and the PPO model side by side: Table 2's metrics
   on the shipped Q&A test set; single-turn answers (KUAKE-QIC style) and simulated multi-turn
   consultations (MedDialog style), judged pairwise. The judge (GPT-4 in the paper) and the
   simulated patient (ChatGPT) are played here by the SFT model itself behind serve.py, the
   OpenAI-compatible server, so that the very code that talks to the OpenAI API runs offline;
   a tiny model rarely writes a verdict the judge's parser can read, and those are counted as
   "unparsed", not guessed;
6. the report: OUT/report.md with SVG plots (losses, reward-model accuracy and margin, PPO score,
   KL and KL coefficient per round, Table 2, win/tie/loss), every number read from this run's
   files, and a summary here.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import evaluate
import serve
import train_ppo
import train_rm
import train_sft
from data.schema import load_jsonl
from safety import COUNT, refuse_to_replace, run_main
from plots import judged, svg_grouped_bars, svg_panels, svg_win_tie_loss

ROOT = Path(__file__).resolve().parent
DATA = ROOT / "data"
SFT_DATA = sorted(str(f) for f in (DATA / "sft").glob("*.jsonl"))
JUDGE_NAME = "huatuo-tiny-sft"  # the served model's id: the SFT model, playing the judge and the patient


def stage(n: int, title: str):
    print(f"\n[{n}/6] {title}", flush=True)


def metrics(path: Path) -> list[dict]:
    return load_jsonl(path) if path.is_file() else []


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "quickstart")
    p.add_argument("--epochs", type=COUNT, default=6, help="SFT epochs over the shipped conversations")
    p.add_argument("--ppo-steps", type=COUNT, default=32, help="PPO optimizer steps (4 rounds of 16 experiences)")
    p.add_argument("--eval-limit", type=COUNT, default=8, help="questions and consultations judged per comparison")
    p.add_argument("--overwrite", action="store_true", help="start over in an --out that holds an earlier run")
    args = p.parse_args(argv)
    out, timings = args.out, {}
    # An earlier run is replaced only when --overwrite says so, as the trainers do.
    refuse_to_replace(
        out,
        ["sft", "samples.jsonl", "rm", "ppo", "eval", "report.md"],
        overwrite=args.overwrite,
        what="run of the main job",
    )
    out.mkdir(parents=True, exist_ok=True)
    sft, ppo, ev = out / "sft", out / "ppo", out / "eval"
    again = ["--overwrite"] if args.overwrite else []

    t = time.monotonic()

    def lap(name: str):  # the stage's wall time, said as it ends and kept for the report and the summary
        nonlocal t
        timings[name], t = time.monotonic() - t, time.monotonic()
        print(f"      {name}: {timings[name]:.0f} s", flush=True)

    stage(1, "supervised fine-tuning of the tiny model on data/sft/ (§3.1)")
    train_sft.main(sft_command(out, args, again))
    lap("SFT")

    stage(2, "sampling 2 responses for each of 8 real-doctor prompts from the SFT model (§3.2)")
    for stale in ("samples.jsonl", "samples.setup.json"):  # `sample` resumes, and refuses another model's file
        (out / stale).unlink(missing_ok=True)
    train_rm.main(sampling_command(out))
    print(
        "      (with an API key, `python distill.py score --input samples.jsonl` has them rated; here the\n"
        "       shipped preference pairs stand in for those ratings)"
    )
    lap("sampling")

    stage(3, "the reward model from the SFT model on data/preference/ (§3.2)")
    train_rm.main(rm_command(out, again))
    lap("reward model")

    stage(4, "PPO from the SFT model against the reward model, KL penalty to the SFT policy (§3.2)")
    train_ppo.main(ppo_command(out, args, again))
    lap("PPO")

    stage(5, "evaluation of the SFT and the PPO model (§4), the judge and the patient served locally")
    evaluation(ev, {"SFT": sft / "best", "PPO": ppo / "final"}, args.eval_limit)
    lap("evaluation")

    stage(6, "the report")
    report = write_report(out, timings)
    print(summary(out, report, timings))


def sft_command(out, args, again) -> list[str]:
    """The SFT stage's command line: the tiny model on data/sft/, --epochs epochs."""
    sft = out / "sft"
    return [
        "--model",
        "tiny",
        "--data",
        *SFT_DATA,
        "--out",
        str(sft),
        *again,
        "--batch-size",
        "8",
        "--lr",
        "2e-3",
        "--epochs",
        str(args.epochs),
        "--eval-every",
        "10",
        "--save-every",
        "1000",
        "--log-every",
        "5",
    ]


def sampling_command(out) -> list[str]:
    """The sampling stage's command line: 2 responses to each of 8 real-doctor prompts."""
    sft = out / "sft"
    return [
        "sample",
        "--model",
        str(sft / "best"),
        "--data",
        str(DATA / "sft" / "doctor_qa.jsonl"),
        "--out",
        str(out / "samples.jsonl"),
        "-k",
        "2",
        "--limit",
        "8",
        "--max-new-tokens",
        "48",
    ]


def rm_command(out, again) -> list[str]:
    """The reward model's command line: pairwise training from the SFT model on data/preference/."""
    sft, rm = out / "sft", out / "rm"
    return [
        "--model",
        str(sft / "best"),
        "--data",
        str(DATA / "preference" / "preference_pairs.jsonl"),
        "--out",
        str(rm),
        *again,
        "--batch-size",
        "4",
        "--lr",
        "1e-3",
        "--epochs",
        "3",
        "--eval-every",
        "8",
        "--save-every",
        "1000",
    ]


def ppo_command(out, args, again) -> list[str]:
    """PPO's command line: 4 rounds of 16 experiences at the default --ppo-steps."""
    sft, rm, ppo = out / "sft", out / "rm", out / "ppo"
    return [
        "--policy",
        str(sft / "best"),
        "--reward",
        str(rm / "best"),
        "--data",
        *SFT_DATA,
        "--exclude",
        str(DATA / "preference" / "preference_pairs.jsonl"),
        "--out",
        str(ppo),
        *again,
        "--max-steps",
        str(args.ppo_steps),
        "--rollout-size",
        "16",
        "--chunk-size",
        "8",
        "--batch-size",
        "8",
        "--max-new-tokens",
        "48",
        "--lr",
        "1e-4",
        "--save-every",
        "1000",
    ]


def evaluation(ev: Path, models: dict[str, Path], limit: int):
    """Table 2 for each model; answers and consultations by each, judged PPO vs. SFT by the SFT
    model behind serve.py. Every output records the model that made it, so a rerun starts over."""
    shutil.rmtree(ev, ignore_errors=True)
    ev.mkdir(parents=True)
    # Decoding for the answers: the settings of the README's Table 2 example rows.
    decoding = ["--temperature", "0.7", "--top-p", "0.9", "--repetition-penalty", "1.1"]
    for name, path in models.items():
        print(f"      Table 2 metrics of the {name} model on data/eval/qa_test.jsonl")
        evaluate.main(
            [
                "bench",
                "--model",
                str(path),
                "--data",
                str(DATA / "eval" / "qa_test.jsonl"),
                "--name",
                name,
                "--out",
                str(ev / f"bench_{name}"),
                "--max-new-tokens",
                "64",
                *decoding,
            ]
        )
    # The judge and the patient: replies of at most 48 tokens keep a judged consultation within
    # the tiny model's 2,048-token context.
    server = serve.start(models["SFT"], JUDGE_NAME, max_tokens=48)
    failed = 0
    try:
        api = ["--base-url", server.base_url, "--backoff", "0.1"]
        for name, path in models.items():
            evaluate.main(
                [
                    "answer",
                    "--model",
                    str(path),
                    "--data",
                    str(DATA / "eval" / "kuake_qic_small.json"),
                    "--out",
                    str(ev / f"answers_{name}.jsonl"),
                    "--limit",
                    str(limit),
                    "--max-new-tokens",
                    "64",
                    *decoding,
                ]
            )
            failed |= evaluate.main(
                [
                    "consult",
                    "--model",
                    str(path),
                    "--data",
                    str(DATA / "eval" / "med_dialog_small.json"),
                    "--out",
                    str(ev / f"consult_{name}.jsonl"),
                    "--limit",
                    str(limit // 2),
                    "--max-rounds",
                    "2",
                    "--max-new-tokens",
                    "32",
                    "--patient-model",
                    JUDGE_NAME,
                    *decoding,
                    *api,
                ]
            )
        for kind in ("answers", "consult"):
            failed |= evaluate.main(
                [
                    "judge",
                    "--a",
                    str(ev / f"{kind}_PPO.jsonl"),
                    "--b",
                    str(ev / f"{kind}_SFT.jsonl"),
                    "--name-a",
                    "PPO",
                    "--name-b",
                    "SFT",
                    "--out",
                    str(ev / f"judge_{kind}.jsonl"),
                    "--judge-model",
                    JUDGE_NAME,
                    "--judge-retries",
                    "0",
                    "--workers",
                    "4",
                    *api,
                ]
            )
    finally:
        server.shutdown()
    if failed:  # the items the server failed are named above; the report counts what was judged
        print("      some items were not done (see above); the report shows what was", flush=True)


# -- the report: every figure read back from this run's files ------------------------------------------


def points(rows: list[dict], key: str, x: str = "step") -> list[tuple[float, float]]:
    return [(r[x], r[key]) for r in rows if key in r and r.get(key) is not None]


def md(text: str) -> str:
    """Model output shown in Markdown: one line, no tags (a tiny model writes `<HuatuoGPT>` too)."""
    return " ".join(text.split()).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def fmt(v, digits=3) -> str:
    return "–" if v is None else f"{v:.{digits}f}"


def write_report(out: Path, timings: dict[str, float]) -> Path:
    """OUT/report.md and its SVG plots, from the files the stages wrote."""
    sft, rm, ppo = (metrics(out / d / "metrics.jsonl") for d in ("sft", "rm", "ppo"))
    lines = [
        "# HuatuoGPT on the embedded default: the whole recipe, one run",
        "",
        "Every figure below is read from this run's files (named in each section). The model is the "
        "`tiny` LLaMA and the data the small corpus shipped in `data/`: the numbers show that each stage "
        "of the paper runs and does what it should, not how good a doctor a model of a few million parameters can be.",
        "",
        "| stage | " + " | ".join(timings) + " | total |",
        "|---" * (len(timings) + 2) + "|",
        "| wall time (s) | " + " | ".join(f"{v:.0f}" for v in timings.values()) + f" | {sum(timings.values()):.0f} |",
        "",
    ]

    lines += sft_section(out, sft) + sampling_section(out) + rm_section(out, rm) + ppo_section(out, ppo)
    lines += eval_section(out)
    lines += answer_examples(out / "eval")
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def sft_section(out: Path, sft: list) -> list[str]:
    """Section 1: supervised fine-tuning, from sft/metrics.jsonl, and its loss plot."""
    val = [r for r in sft if "val_loss" in r]
    best = min(val, key=lambda r: r["val_loss"], default=None)
    (out / "sft_loss.svg").write_text(
        svg_panels(
            "Supervised fine-tuning (§3.1)",
            [("loss (nats/token)", {"training": points(sft, "loss"), "validation": points(sft, "val_loss")})],
            "optimizer step",
        ),
        encoding="utf-8",
    )
    lines = [
        "## 1. Supervised fine-tuning",
        "",
        f"`sft/metrics.jsonl`: {sum('loss' in r for r in sft)} steps; validation loss "
        f"{fmt(val[0]['val_loss'] if val else None)} before training, best {fmt(best and best['val_loss'])} "
        f"at step {best and best['step']} (kept as `sft/best`).",
        "",
        "![SFT loss](sft_loss.svg)",
        "",
    ]
    return lines


def sampling_section(out: Path) -> list[str]:
    """Section 2: the responses sampled for the reward model (samples.jsonl)."""
    samples = load_jsonl(out / "samples.jsonl") if (out / "samples.jsonl").is_file() else []
    responses = sum(len(s["responses"]) for s in samples)
    finished = sum(sum(s["finished"]) for s in samples)
    lines = [
        "## 2. Sampling for the reward model",
        "",
        f"`samples.jsonl`: {responses} responses to {len(samples)} real-doctor prompts; {finished} ended with "
        f"eos, {responses - finished} were cut at 48 tokens (those `distill.py score` does not rate).",
        "",
    ]
    return lines


def rm_section(out: Path, rm: list) -> list[str]:
    """Section 3: the reward model, from rm/metrics.jsonl, and its plot."""
    rv = [r for r in rm if "val_accuracy" in r]
    rbest = max(rv, key=lambda r: (r["val_accuracy"], r["val_margin"]), default=None)
    (out / "rm.svg").write_text(
        svg_panels(
            "Reward model from mixed feedback (§3.2)",
            [
                ("pairwise loss", {"training": points(rm, "loss")}),
                (
                    "held-out accuracy",
                    {"validation": points(rm, "val_accuracy"), "chance": [(r["step"], 0.5) for r in rv]},
                ),
                ("held-out margin", {"validation": points(rm, "val_margin")}),
            ],
            "optimizer step",
        ),
        encoding="utf-8",
    )
    lines = [
        "## 3. Reward model",
        "",
        f"`rm/metrics.jsonl`: held-out pairwise accuracy {fmt(rv[0]['val_accuracy'] if rv else None)} before "
        f"training, best {fmt(rbest and rbest['val_accuracy'])} at step {rbest and rbest['step']} with a mean "
        f"margin r(chosen) − r(rejected) of {fmt(rbest and rbest['val_margin'])}.",
        "",
        "![reward model](rm.svg)",
        "",
    ]
    return lines


def ppo_section(out: Path, ppo: list) -> list[str]:
    """Section 4: PPO, a row per round of ppo/metrics.jsonl, and its plot."""
    (out / "ppo.svg").write_text(
        svg_panels(
            "RLMF: PPO with a KL penalty (§3.2)",
            [
                ("mean reward-model score", {"score": points(ppo, "score", "round")}),
                ("KL to the SFT policy (nats)", {"KL": points(ppo, "kl", "round")}),
                ("KL coefficient λ", {"λ_KL": points(ppo, "kl_coef", "round")}),
            ],
            "round",
        ),
        encoding="utf-8",
    )
    lines = [
        "## 4. PPO",
        "",
        "`ppo/metrics.jsonl`: one row per round of rollouts.",
        "",
        "| round | step | mean score | KL (nats) | λ_KL | policy loss | value loss | clip fraction | "
        "response length | unfinished |",
        "|---" * 10 + "|",
    ]
    lines += [
        f"| {r['round']} | {r['step']} | {fmt(r['score'])} | {fmt(r['kl'])} | {fmt(r['kl_coef'], 6)} | "
        f"{fmt(r['policy_loss'])} | {fmt(r['value_loss'])} | {fmt(r['clip_fraction'])} | "
        f"{fmt(r['response_len'], 1)} | {fmt(r['unfinished'], 2)} |"
        for r in ppo
    ]
    lines += ["", "![PPO](ppo.svg)", ""]
    return lines


def eval_section(out: Path) -> list[str]:
    """Section 5: Table 2's metrics and the judge's verdicts, from eval/, with their charts."""
    ev = out / "eval"
    lines = [
        "## 5. Evaluation",
        "",
        "### Table 2: generation metrics on `data/eval/qa_test.jsonl`",
        "",
        "| model | items | " + " | ".join(evaluate.TABLE2) + " |",
        "|---" * (len(evaluate.TABLE2) + 2) + "|",
    ]
    table2 = {}
    for name in ("SFT", "PPO"):
        bench = ev / f"bench_{name}"
        if (bench / "metrics.json").is_file():
            m = json.loads((bench / "metrics.json").read_text(encoding="utf-8"))
            table2[name] = [m[k] for k in evaluate.TABLE2]
            n = len(load_jsonl(bench / "predictions.jsonl"))
            lines.append(f"| {name} | {n} | " + " | ".join(f"{v:.2f}" for v in table2[name]) + " |")
    if table2:
        (out / "table2.svg").write_text(
            svg_grouped_bars(
                "Table 2 metrics (BLEU, GLEU, ROUGE in %; Distinct as a fraction)", evaluate.TABLE2, table2
            ),
            encoding="utf-8",
        )
        lines += ["", "![Table 2](table2.svg)", ""]
    bars = []
    for kind, title in (
        ("answers", "single-turn answers (KUAKE-QIC style, Table 4)"),
        ("consult", "consultations with a simulated patient (MedDialog style, Table 5)"),
    ):
        path = ev / f"judge_{kind}.jsonl"
        verdicts = load_jsonl(path) if path.is_file() else []
        if not verdicts:
            continue
        total = evaluate.tally(verdicts)["Total"]
        bars.append((f"PPO vs. SFT, {kind}", total))
        lines += [
            f"### PPO vs. SFT: {title}",
            "",
            f"`eval/judge_{kind}.jsonl`, judged by `{JUDGE_NAME}` through "
            f"serve.py with the App. D prompt; {total['unparsed']} of {len(verdicts)} verdicts could not be "
            "parsed (counted, not guessed).",
            "",
            evaluate.table(verdicts, "PPO", "SFT"),
            "",
        ]
    (out / "win_tie_loss.svg").unlink(missing_ok=True)
    if judged(bars):
        (out / "win_tie_loss.svg").write_text(svg_win_tie_loss("PPO vs. SFT, judged", bars), encoding="utf-8")
        lines += ["![win, tie, loss](win_tie_loss.svg)", ""]
    elif bars:
        lines += [
            "No verdict of the judge could be parsed, so there is no win/tie/loss chart: "
            + "; ".join(f"{label}: {c['unparsed']} unparsed" for label, c in bars)
            + ".",
            "",
        ]
    return lines


def answer_examples(ev: Path, most: int = 3) -> list[str]:
    """Report lines: questions both models answered, the ones where they differ first (up to
    `most`); when they answered every question alike, one of them and a sentence saying so."""
    answers = {
        name: {r["id"]: r for r in load_jsonl(ev / f"answers_{name}.jsonl")}
        for name in ("SFT", "PPO")
        if (ev / f"answers_{name}.jsonl").is_file()
    }
    if len(answers) < 2:
        return []
    reply = lambda name, i: answers[name][i]["messages"][1]["content"]  # noqa: E731
    both = [i for i in answers["SFT"] if i in answers["PPO"]]
    differ = [i for i in both if reply("SFT", i) != reply("PPO", i)]
    shown = differ[:most] or both[:1]
    if not shown:
        return []
    lines = [f"### {'Questions' if len(shown) > 1 else 'One question'}, both models (`eval/answers_*.jsonl`)", ""]
    if not differ:
        lines += [f"The two models gave the same answer to each of the {len(both)} questions; one of them:", ""]
    elif len(differ) < len(both):
        lines += [
            f"The models' answers differ on {len(differ)} of {len(both)} questions; "
            f"{'the first ' + str(len(shown)) if len(shown) < len(differ) else 'those'}:",
            "",
        ]
    for i in shown:
        lines += [f"> **病人**：{md(answers['SFT'][i]['messages'][0]['content'])}", ">"]
        for name in ("SFT", "PPO"):
            lines += [f"> **HuatuoGPT ({name})**：{md(reply(name, i))}", ">"]
        lines[-1] = ""
    return lines


def summary(out: Path, report: Path, timings: dict[str, float] | None = None) -> str:
    """What the terminal shows at the end: the figures that matter, the time each stage took, and
    where everything is."""
    sft, rm, ppo = (metrics(out / d / "metrics.jsonl") for d in ("sft", "rm", "ppo"))
    val = [r["val_loss"] for r in sft if "val_loss" in r]
    acc = [r["val_accuracy"] for r in rm if "val_accuracy" in r]
    lines = [
        "",
        "=" * 72,
        "HuatuoGPT's recipe ran end to end on the embedded default.",
        f"  SFT          validation loss {val[0]:.3f} -> best {min(val):.3f}" if val else "  SFT          -",
        f"  reward model held-out accuracy {acc[0]:.3f} -> best {max(acc):.3f} (chance 0.5)"
        if acc
        else "  reward model -",
        "  PPO          mean score " + " -> ".join(f"{r['score']:.3f}" for r in ppo),
        "               KL to the SFT policy " + " -> ".join(f"{r['kl']:.3f}" for r in ppo) + " nats",
    ]
    for name in ("SFT", "PPO"):
        m = out / "eval" / f"bench_{name}" / "metrics.json"
        if m.is_file():
            m = json.loads(m.read_text(encoding="utf-8"))
            lines.append(
                f"  Table 2 {name}  BLEU-1 {m['BLEU-1']:.2f}  ROUGE-L {m['ROUGE-L']:.2f}  "
                f"Distinct-2 {m['Distinct-2']:.2f}"
            )
    for kind in ("answers", "consult"):
        path = out / "eval" / f"judge_{kind}.jsonl"
        if path.is_file():
            c = evaluate.tally(load_jsonl(path))["Total"]
            lines.append(
                f"  judged PPO vs. SFT ({kind}): {c['win']} win, {c['tie']} tie, {c['loss']} loss, "
                f"{c['unparsed']} unparsed"
            )
    if timings:
        lines.append(
            "  time         "
            + ", ".join(f"{name} {seconds:.0f} s" for name, seconds in timings.items())
            + f"; {sum(timings.values()):.0f} s in all"
        )
    lines += [
        f"report: {report} (open it in any Markdown viewer; the plots are the .svg files beside it)",
        f"models: {out / 'sft' / 'best'}, {out / 'rm' / 'best'}, {out / 'ppo' / 'final'} (Hugging Face layout)",
        f"talk to one: python chat.py --model {out / 'ppo' / 'final'}",
        f"serve one:   python serve.py --model {out / 'ppo' / 'final'}",
        "=" * 72,
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(run_main(main))
