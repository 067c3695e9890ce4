"""Consult a model in the terminal: multi-turn, the reply streamed as it is sampled.

    python chat.py --model runs/quickstart/ppo/final
    python chat.py --model ziya-13b-huatuo --device cuda --dtype bfloat16

Each turn is prompted with the whole conversation so far through the HuatuoGPT template
(data.template.render, as in training); when the conversation outgrows the context the oldest
rounds are left out, and the chat says so. Type `clear` to start a new consultation, `quit`
(or `exit`, `stop`, Ctrl-D) to leave; Ctrl-C stops a reply that runs on and keeps the chat.
Works with any checkpoint in the HF layout: ours, or a converted Ziya-LLaMA-13B (convert.py).
"""

from __future__ import annotations

import argparse
import os
import select
import sys

from safety import run_main
from data.template import CHAT_SAMPLING, DOCTOR_TAG, PATIENT_TAG
from evaluate import Doctor, make_doctor
from generate import add_device_args, add_sampling_args

CLEAR = {"clear", "/clear"}
QUIT = {"quit", "exit", "stop", "/quit", "/exit"}


def chat(doctor: Doctor, ask, write) -> int:
    """The loop: ask(prompt) returns the next line typed (None at the end), write(text) shows
    text. Returns the number of replies given."""
    history: list[dict] = []
    replies = 0
    write(f"HuatuoGPT ({doctor.path}). `clear` starts over, `quit` leaves.\n")
    while True:
        line = ask(PATIENT_TAG)
        if line is None or line.strip().lower() in QUIT:
            return replies
        question = line.strip()
        if not question:
            continue
        if question.lower() in CLEAR:
            history = []
            write("(a new consultation)\n")
            continue
        conversation = history + [{"role": "user", "content": question}]
        try:
            prompt = doctor.prompt(conversation)
        except ValueError as e:
            write(f"(not asked: {e})\n")
            continue
        if prompt.rounds_dropped:
            write(f"(the {prompt.rounds_dropped} oldest round(s) no longer fit the context and are left out)\n")
        write(DOCTOR_TAG)
        answer = []
        try:
            for piece in doctor.stream(prompt.ids):
                answer.append(piece)
                write(piece)
        except KeyboardInterrupt:
            write(" (stopped)")
        write("\n")
        history = conversation + [{"role": "assistant", "content": "".join(answer)}]
        replies += 1


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="an HF-format directory with tokenizer.model")
    # 512 new tokens as the official demo; the sampling settings are ours (data.template.CHAT_SAMPLING,
    # which every exported checkpoint carries as generation_config.json).
    add_sampling_args(p, **CHAT_SAMPLING, why="; ours, the paper gives none")
    add_device_args(p)
    doctor = make_doctor(p.parse_args(argv))

    def write(text):
        sys.stdout.write(text)
        sys.stdout.flush()

    # Bytes that are not UTF-8 (a terminal in another encoding, a binary file piped in) become
    # U+FFFD and the chat says so, rather than ending it and the conversation with a traceback.
    sys.stdin.reconfigure(errors="replace")

    terminal = sys.stdin.isatty()
    typed: list[str] = []  # whole lines typed while a reply streamed, asked in turn

    def ask(prompt):
        if terminal and not typed and select.select([sys.stdin], [], [], 0)[0]:
            # Typed while the reply streamed, when the terminal was in its line mode: a Ctrl-D
            # there is an end of file for one read(), which readline (raw mode for the prompt)
            # would never make, so the Ctrl-D was lost. Read it here: b"" is that Ctrl-D.
            ahead = os.read(sys.stdin.fileno(), 1 << 16)
            if not ahead:
                write(prompt + "\n")
                return None
            typed.extend(ahead.decode(errors="replace").splitlines())
        if typed:
            line = typed.pop(0)
            write(prompt + line + "\n")
        else:
            try:
                line = input(prompt)
            except (EOFError, KeyboardInterrupt):  # Ctrl-D, or Ctrl-C at the prompt: leave
                write("\n")
                return None
        if "\ufffd" in line:
            write("(part of that line was not UTF-8 text; it is shown to the model as �)\n")
        return line

    if terminal:
        import readline  # noqa: F401  (line editing and history for input())
    try:
        chat(doctor, ask, write)
    except BrokenPipeError:  # `chat.py | head`: the reader has gone, and so do we, quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


if __name__ == "__main__":
    sys.exit(run_main(main))
