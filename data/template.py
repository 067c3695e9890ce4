"""The HuatuoGPT chat template: the one function that turns messages into token ids.

Training, sampling, evaluation and serving all call `render`, so what the model is trained on
is exactly what it is prompted with. The ids and labels are, token for token, those of the
official training script (HuatuoGPT repo, `scripts/finetune.py`, `preprocess`), which encodes
the system text with the tokenizer's special tokens (`add_special_tokens=True`: <s> where the
tokenizer's add_bos_token says so, as Ziya's does and HuatuoGPT-7B's, Baichuan-7B's, does not)
and then each utterance as a segment of its own, without:

    [<s>] + enc(SYSTEM)                              masked   (<s> if the tokenizer adds it)
    enc("<病人>：" + question + " ")                  masked   (one per round)
    enc("<HuatuoGPT>：" + answer + " ") + [</s>]      trained  (one per round)

`enc` is the sentencepiece model itself, so every segment starts with its dummy-prefix "▁"
(LLaMA's tokenizer adds one to each encoded text) and the space that closes a segment is a
"▁" piece of its own: the patient's turn ends with a masked "▁", the doctor's with a trained
"▁" and then </s>. The doctor's role tag is part of the trained segment, as in the official
code: the model learns to say `<HuatuoGPT>：` after the patient has spoken, and the answer's
first piece follows the tag's "：" with no "▁" of its own.

The one choice. The official script writes the doctor's end as the text " </s>" and leaves the
space to the tokenizer: the fast LLaMA tokenizer that `AutoTokenizer` returns by default keeps
it as a "▁" before </s>; the slow LlamaTokenizer of transformers before 4.31 stripped spaces
next to special tokens and gave none. We keep the "▁", as the default path of the official
script does (`AutoTokenizer.from_pretrained`, use_fast left at True).

A generation prompt for round k is exactly the training ids up to the first answer token of
round k: everything before, then the patient's segment, then the ids of the tag
`<HuatuoGPT>：` (the pieces that begin the doctor's segment; LLaMA's and Ziya's vocabularies
have no piece that joins "：" to a following character, so the tag ends on a piece boundary).

Where the official inference demo differs (`huatuo_cli_demo_stream.py`): it encodes the whole
conversation as one string, `{SYSTEM}<病人>：{q} <HuatuoGPT>：` with earlier answers followed
directly by </s>, so its pieces differ at the segment boundaries (no "▁" before each tag, the
space before `<HuatuoGPT>` merged into the question's last piece, none before </s>). We prompt
with what the model was trained on instead.

Truncation, one rule: only whole rounds are ever removed, never part of one. (The official
script cuts every sequence at max_seq_len, mid-round if need be; a cut-off answer then trains
the model to stop without its eos. We do not.)
  * Training (the conversation ends with an answer): keep the longest run of rounds from the
    start that fits in max_len; the later rounds are dropped. Every kept answer thus has its
    true history and its own eos. If not even the first round fits, render returns None and
    the caller counts the conversation as dropped.
  * A generation prompt (it ends with a question): drop the oldest rounds until it fits; the
    question itself must fit whole, or render raises.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

SYSTEM = (
    "一位用户和智能医疗大模型HuatuoGPT之间的对话。对于用户的医疗问诊，HuatuoGPT给出准确的、详细的、温暖的"
    "指导建议。对于用户的指令问题，HuatuoGPT给出有益的、详细的、有礼貌的回答。"
)
PATIENT_TAG = "<病人>："
DOCTOR_TAG = "<HuatuoGPT>："
TURN_END = " "  # the official UTTER_END_SIGNAL; a doctor's turn ends with ROUND_END_SIGNAL, " </s>"
# The official inference demo's prompt (HuatuoGPT repo at 1412a5d, huatuo_cli_demo_stream.py,
# generate_prompt) as the Jinja chat template every exported checkpoint carries in
# tokenizer_config.json, for transformers' apply_chat_template, vLLM and TGI: SYSTEM, then per
# round "<病人>：{question} <HuatuoGPT>：{answer}</s>", the last question followed by the tag. The
# demo's string has no <s>: its tokenizer(prompt) adds one where the tokenizer's add_bos_token says
# so. A template is encoded without special tokens (apply_chat_template, vLLM's chat endpoint), so
# the <s> is written into it for a tokenizer that adds one (chat_template(add_bos)). A string
# template encoded whole cannot give render's segment-wise ids (see "Where the official inference
# demo differs" above): a server that applies it prompts as the demo did, not as we trained.
CHAT_TEMPLATE = (
    "{{ '" + SYSTEM + "' }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ '" + PATIENT_TAG + "' + message['content'] + '" + TURN_END + "' }}"
    "{% elif message['role'] == 'assistant' %}{{ '" + DOCTOR_TAG + "' + message['content'] + eos_token }}"
    "{% else %}{{ raise_exception('HuatuoGPT has no ' + message['role'] + ' role: user and assistant only') }}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '" + DOCTOR_TAG + "' }}{% endif %}"
)


def chat_template(add_bos: bool) -> str:
    """CHAT_TEMPLATE for a tokenizer that starts a text with <s> (add_bos) or without."""
    return "{{ bos_token }}" * add_bos + CHAT_TEMPLATE


# How chat.py samples, written as generation_config.json into every exported checkpoint: at most
# 512 new tokens as the official demo (huatuo_cli_demo_stream.py, --max-new-tokens); temperature,
# top-p and repetition penalty are ours (the paper gives none). The demo as it runs (commit
# 1412a5d) samples softmax(logits / temperature) at its --temperature 0.5, no top-p, and no
# penalty: main() passes repetition_penalty=1.2 to chat_stream, whose body never reads it.
CHAT_SAMPLING = {"max_new_tokens": 512, "temperature": 0.7, "top_p": 0.9, "repetition_penalty": 1.1}
IGNORE_INDEX = -100  # cross_entropy's ignore_index: no loss on this position
MAX_LEN = 2048  # paper App. E: maximum context length 2048


@dataclass
class Rendered:
    ids: list[int]
    labels: list[int]
    rounds_dropped: int = 0
    labelled: int | None = None  # labelled positions after the first, when known (data.corpus)


def patient_turn(tok, question: str) -> list[int]:
    return tok.encode(PATIENT_TAG + question + TURN_END)


def doctor_turn(tok, answer: str) -> list[int]:
    return tok.encode(DOCTOR_TAG + answer + TURN_END) + [tok.eos_id]


def render(
    tok, messages: list[dict], *, max_len: int = MAX_LEN, generation_prompt: bool | None = None, system: str = SYSTEM
):
    """messages -> Rendered(ids, labels), or None if not even one training round fits.

    generation_prompt defaults to "the last message is the user's": then the ids end with the
    doctor's tag, ready for sampling, and every label is IGNORE_INDEX. `system` replaces the
    paper's system text (serve.py passes a request's system message; nothing else does).
    """
    if generation_prompt is None:
        generation_prompt = messages[-1]["role"] == "user"
    head = tok.bos + tok.encode(system)  # <s> where the tokenizer adds it (Tokenizer.add_bos)
    rounds = []  # (patient ids, doctor ids or None)
    for i in range(0, len(messages), 2):
        answer = doctor_turn(tok, messages[i + 1]["content"]) if i + 1 < len(messages) else None
        rounds.append((patient_turn(tok, messages[i]["content"]), answer))
    if generation_prompt:
        if rounds[-1][1] is not None:
            raise ValueError("a generation prompt must end with the user's message")
        rounds[-1] = (rounds[-1][0], tok.encode(DOCTOR_TAG))  # the turn the model is to continue
        keep = len(rounds)
        while keep > 0 and len(head) + sum(len(p) + len(a) for p, a in rounds[-keep:]) > max_len:
            keep -= 1
        if keep == 0:
            need = len(head) + len(rounds[-1][0]) + len(rounds[-1][1])
            raise ValueError(f"the question alone takes {need} tokens with the system text; the limit is {max_len}")
        ids = head + [t for p, a in rounds[-keep:] for t in p + a]
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


def pad_batch(sequences: list[list[int]], pad_id: int, *, left: bool = False):
    """Sequences of different lengths as one batch: (tokens, attention_mask), (B, longest), each
    sequence at the right of its row (left=True: prompts for generation, so that every row's
    next token lands in the same column) or at its left, the rest pad_id with mask 0. The one
    padding of the project: training, scoring, PPO's experiences and sampling all batch here."""
    width = max(len(s) for s in sequences)
    tokens = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, s in enumerate(sequences):
        span = slice(width - len(s), width) if left else slice(0, len(s))
        tokens[i, span], mask[i, span] = torch.tensor(s, dtype=torch.long), 1
    return tokens, mask


def collate(items: list[Rendered], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch for training: tokens, labels (-100 on padding), attention_mask."""
    tokens, mask = pad_batch([r.ids for r in items], pad_id)
    labels, _ = pad_batch([r.labels for r in items], IGNORE_INDEX)
    return {"tokens": tokens, "labels": labels, "attention_mask": mask}


def render_reply(tok, messages: list[dict], reply: str, *, max_len: int = MAX_LEN):
    """A prompt (ending with the user's turn) and a reply to it, as the reward model scores it
    and PPO trains on it: exactly the ids render gives the conversation with that reply as its
    last answer (the doctor's whole segment, tag to eos). The reply is never cut: the oldest
    rounds of the prompt make room for it (render's rule for prompts). Returns (ids, index of
    the reply's first token, just after the doctor's tag)."""
    turn, tag = doctor_turn(tok, reply), tok.encode(DOCTOR_TAG)
    prompt = render(tok, messages, max_len=max_len - len(turn) + len(tag), generation_prompt=True)
    ids = prompt.ids[: len(prompt.ids) - len(tag)] + turn
    # The reply starts after the tag's pieces (with a vocabulary that joined "：" to the reply's
    # first character, after the pieces the two share).
    shared = next((i for i, (a, b) in enumerate(zip(tag, turn)) if a != b), len(tag))
    return ids, len(ids) - len(turn) + shared


# How a reward model reads a conversation and its reply, by the name in its reward_config.json
# ("format"; pretrained.reward_format):
#   huatuo   this file's template (render_reply): what train_rm.py trains and PPO scores by ids.
#   ziya-rm  the released HuatuoGPT-reward-model-7B's: Ziya-LLaMA-7B-Reward's usage, to which the
#            HuatuoGPT maintainers point, "Human:" + question + "\n\nAssistant:" + reply encoded as
#            one text, <s> where its tokenizer adds one, and an eos after it (the score is read
#            there). Earlier rounds, which that usage does not show, are written the same way and
#            joined by "\n\n": our choice.
ZIYA_HUMAN, ZIYA_ASSISTANT, ZIYA_ROUNDS = "Human:", "\n\nAssistant:", "\n\n"
REWARD_FORMATS = {"huatuo": "data.template.render_reply", "ziya-rm": "<s>?Human:{question}\\n\\nAssistant:{reply}</s>"}


def reward_ids(tok, messages: list[dict], reply: str, prompt_format: str, *, max_len: int) -> list[int]:
    """The ids a reward model of `prompt_format` scores for `reply` to `messages` (ending with
    the user's turn), in its own tokenizer `tok`. The oldest rounds make room where it is too
    long (render's rule); ValueError where the last question and the reply alone do not fit."""
    if prompt_format == "huatuo":
        return render_reply(tok, messages, reply, max_len=max_len)[0]
    if prompt_format != "ziya-rm":
        raise ValueError(f"unknown reward prompt format {prompt_format!r}; known: {', '.join(REWARD_FORMATS)}")
    answers = [m["content"] for m in messages[1::2]] + [reply]
    rounds = [ZIYA_HUMAN + m["content"] + ZIYA_ASSISTANT + a for m, a in zip(messages[0::2], answers)]
    for first in range(len(rounds)):
        ids = tok.bos + tok.encode(ZIYA_ROUNDS.join(rounds[first:])) + [tok.eos_id]
        if len(ids) <= max_len:
            return ids
    raise ValueError(
        f"the question and reply take {len(ids)} tokens in the reward model's format; the limit is {max_len}"
    )
