"""The HuatuoGPT chat template: the one function that turns messages into token ids.

Training, sampling, evaluation and serving all call `render`, so what the model is trained on
is exactly what it is prompted with. The layout is the official HuatuoGPT one:

    <s>{SYSTEM}<病人>：{user 1} <HuatuoGPT>：{assistant 1}</s><病人>：{user 2} <HuatuoGPT>：…

and a generation prompt ends with `<病人>：{question} <HuatuoGPT>：`.

Loss mask. Labels are -100 everywhere except on the assistant's tokens and the eos that
closes each of its turns: the model learns to answer, and to stop, but never to imitate the
patient or the system text.

Segments. The system text, each `<病人>：… <HuatuoGPT>：` prompt and each answer are encoded
on their own and concatenated, so a prompt/answer boundary is always a token boundary and the
labels line up exactly. (Encoding the whole string at once could merge the last character of a
prompt with the first of an answer into one piece, half masked, half not.)

Truncation, one rule: only whole rounds are ever removed, never part of one.
  * Training (the conversation ends with an answer): keep the longest run of rounds from the
    start that fits in max_len; the later rounds are dropped. Every kept answer thus has its
    true history and its own eos. If not even the first round fits, render returns None and
    the caller counts the conversation as dropped — a cut-off answer is never trained on.
  * A generation prompt (it ends with a question): drop the oldest rounds until it fits; the
    question itself must fit whole, or render raises.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

SYSTEM = ("一位用户和智能医疗大模型HuatuoGPT之间的对话。对于用户的医疗问诊，HuatuoGPT给出准确的、详细的、温暖的"
          "指导建议。对于用户的指令问题，HuatuoGPT给出有益的、详细的、有礼貌的回答。")
USER_TAG = "<病人>："
ASSISTANT_TAG = " <HuatuoGPT>："
IGNORE_INDEX = -100  # cross_entropy's ignore_index: no loss on this position
MAX_LEN = 2048  # paper App. E: maximum context length 2048


@dataclass
class Rendered:
    ids: list[int]
    labels: list[int]
    rounds_dropped: int = 0


def render(tok, messages: list[dict], *, max_len: int = MAX_LEN, generation_prompt: bool | None = None):
    """messages -> Rendered(ids, labels), or None if not even one training round fits.

    generation_prompt defaults to "the last message is the user's": then the ids end with the
    assistant tag, ready for sampling, and every label is IGNORE_INDEX.
    """
    if generation_prompt is None:
        generation_prompt = messages[-1]["role"] == "user"
    head = [tok.bos_id] + tok.encode(SYSTEM)
    rounds = []  # (prompt ids, answer ids or None)
    for i in range(0, len(messages), 2):
        prompt = tok.encode(USER_TAG + messages[i]["content"] + ASSISTANT_TAG)
        answer = tok.encode(messages[i + 1]["content"]) + [tok.eos_id] if i + 1 < len(messages) else None
        rounds.append((prompt, answer))
    if generation_prompt:
        if rounds[-1][1] is not None:
            raise ValueError("a generation prompt must end with the user's message")
        keep = len(rounds)
        while keep > 0 and len(head) + sum(len(p) + len(a or ()) for p, a in rounds[-keep:]) > max_len:
            keep -= 1
        if keep == 0:
            need = len(head) + len(rounds[-1][0])
            raise ValueError(f"the question alone takes {need} tokens with the system text; the limit is {max_len}")
        ids = head + [t for p, a in rounds[-keep:] for t in p + (a or [])]
        return Rendered(ids, [IGNORE_INDEX] * len(ids), len(rounds) - keep)
    if rounds[-1][1] is None:
        raise ValueError("training data must end with the assistant's message")
    ids, labels, kept = list(head), [IGNORE_INDEX] * len(head), 0
    for prompt, answer in rounds:
        if len(ids) + len(prompt) + len(answer) > max_len:
            break
        ids += prompt + answer
        labels += [IGNORE_INDEX] * len(prompt) + answer
        kept += 1
    if kept == 0:
        return None
    return Rendered(ids, labels, len(rounds) - kept)


def collate(items: list[Rendered], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch for training: tokens, labels (-100 on padding), attention_mask."""
    width = max(len(r.ids) for r in items)
    tokens = torch.full((len(items), width), pad_id, dtype=torch.long)
    labels = torch.full((len(items), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(items), width), dtype=torch.long)
    for i, r in enumerate(items):
        n = len(r.ids)
        tokens[i, :n] = torch.tensor(r.ids)
        labels[i, :n] = torch.tensor(r.labels)
        mask[i, :n] = 1
    return {"tokens": tokens, "labels": labels, "attention_mask": mask}


def render_reply(tok, messages: list[dict], reply: str, *, max_len: int = MAX_LEN):
    """A prompt (ending with the user's turn) and a reply to it, as the reward model scores it
    and PPO trains on it: the generation prompt, then the reply and its eos, exactly as render
    would encode that last round. The reply is never cut: the oldest rounds of the prompt make
    room for it (render's rule for prompts). Returns (ids, index of the reply's first token)."""
    answer = tok.encode(reply) + [tok.eos_id]
    prompt = render(tok, messages, max_len=max_len - len(answer), generation_prompt=True)
    return prompt.ids + answer, len(prompt.ids)
