"""data/: the schema, the chat template and its loss mask, readers, mixing and batching."""

import json
import os
from pathlib import Path

import pytest

from data.__main__ import main as data_cli
from data.mixing import LengthGroupedBatches, Source, mix, normalise
from data.readers import (
    KUAKE_QIC_LABELS,
    read,
    read_cmedqa2,
    read_huatuo26m,
    read_huatuo_sft,
    read_kuake_qic,
    read_med_dialog_100,
    read_meddialog,
    read_pairs,
    read_schema,
    read_webmedqa,
)
from data.schema import RecordError, Report, from_huatuo, to_huatuo
from data.template import DOCTOR_TAG, IGNORE_INDEX, PATIENT_TAG, SYSTEM, collate, doctor_turn, render
from tokenizer import Tokenizer
from pretrained import config_to_hf

DATA = Path(__file__).resolve().parents[1] / "data"
TWO_ROUNDS = [
    {"role": "user", "content": "我头痛三天了。"},
    {"role": "assistant", "content": "有没有发烧？"},
    {"role": "user", "content": "没有发烧。"},
    {"role": "assistant", "content": "先休息，多喝水。"},
]


@pytest.fixture(scope="module")
def tok(tokenizer_file):
    return Tokenizer(tokenizer_file)


# -- the template ---------------------------------------------------------------------------


# The official segmentation, written out by hand in the pieces of the tests' tokenizer
# (conftest.CORPUS, 400 pieces, byte fallback): what scripts/finetune.py's preprocess gives,
# system text aside (encoded with bos, as there). Each segment starts with sentencepiece's
# dummy "▁" and ends with the "▁" of its closing space; the doctor's tag is trained on.
PATIENT_1 = [
    "▁",
    "<0x3C>",
    "病",
    "<0xE4>",
    "<0xBA>",
    "<0xBA>",
    "<0x3E>",
    "<0xEF>",
    "<0xBC>",
    "<0x9A>",  # ▁<病人>：
    "头痛",
    "三",
    "天",
    "<0xE4>",
    "<0xBA>",
    "<0x86>",
    "▁",
]  # 头痛三天了, then the space
DOCTOR_TAG_PIECES = [
    "▁",
    "<0x3C>",
    "H",
    "<0x75>",
    "<0x61>",
    "<0x74>",
    "<0x75>",
    "<0x6F>",
    "<0x47>",
    "<0x50>",
    "<0x54>",
    "<0x3E>",
    "<0xEF>",
    "<0xBC>",
    "<0x9A>",
]  # ▁<HuatuoGPT>：
ANSWER_1 = ["有", "<0xE6>", "<0xB2>", "<0xA1>", "有", "发", "烧", "？"]  # 有没有发烧？ with no "▁" of its own
ONE_ROUND = [{"role": "user", "content": "头痛三天了"}, {"role": "assistant", "content": "有没有发烧？"}]


def pieces(tok, ids):
    return [tok.sp.id_to_piece(i) for i in ids]


def test_official_token_sequence_by_hand(tok):
    out = render(tok, ONE_ROUND)
    head = [1] + tok.encode(SYSTEM)
    doctor = DOCTOR_TAG_PIECES + ANSWER_1 + ["▁", "</s>"]
    assert out.ids[: len(head)] == head
    assert pieces(tok, out.ids[len(head) :]) == PATIENT_1 + doctor
    trained = [p for p, lab in zip(pieces(tok, out.ids), out.labels) if lab != IGNORE_INDEX]
    assert trained == doctor  # the tag, the answer, the space and eos; never the patient or the system
    assert all(lab in (IGNORE_INDEX, i) for i, lab in zip(out.ids, out.labels))
    # The generation prompt is the training ids up to the answer's first piece.
    prompt = render(tok, ONE_ROUND[:1])
    assert prompt.ids == out.ids[: len(head) + len(PATIENT_1) + len(DOCTOR_TAG_PIECES)]
    assert set(prompt.labels) == {IGNORE_INDEX}


def test_two_rounds_are_the_official_segments(tok):
    out = render(tok, TWO_ROUNDS)
    e = tok.encode
    head = [1] + e(SYSTEM)
    p1, a1 = e("<病人>：我头痛三天了。 "), e("<HuatuoGPT>：有没有发烧？ ") + [2]
    p2, a2 = e("<病人>：没有发烧。 "), e("<HuatuoGPT>：先休息，多喝水。 ") + [2]
    assert out.ids == head + p1 + a1 + p2 + a2
    ignore = [IGNORE_INDEX]
    assert out.labels == ignore * (len(head) + len(p1)) + a1 + ignore * len(p2) + a2
    assert (PATIENT_TAG, DOCTOR_TAG) == ("<病人>：", "<HuatuoGPT>：") and a1 == doctor_turn(tok, "有没有发烧？")
    # The text is the official prompt, up to the spaces the segments add.
    official = (
        SYSTEM + "<病人>：我头痛三天了。 <HuatuoGPT>：有没有发烧？ <病人>：没有发烧。 <HuatuoGPT>：先休息，多喝水。 "
    )
    assert tok.decode(out.ids).replace(" ", "") == official.replace(" ", "")


@pytest.mark.parametrize("add_bos", [True, False, None])
def test_the_tokenizers_own_bos_setting_decides_whether_a_prompt_starts_with_s(tmp_path, tokenizer_file, add_bos):
    """Ziya's tokenizer adds <s>, HuatuoGPT-7B's (Baichuan-7B's config) does not; absent, as
    transformers' default, it does. The oracle is the official preprocess (scripts/finetune.py:
    the system text with add_special_tokens=True, every utterance without) run through
    transformers on the tokenizer files our export writes: render agrees, so those files say the
    truth about <s> too."""
    import shutil

    from transformers import AutoTokenizer

    from checkpoint import write_checkpoint
    from model import ModelConfig

    src = tmp_path / "src"
    src.mkdir()
    shutil.copyfile(tokenizer_file, src / "tokenizer.model")
    if add_bos is not None:
        (src / "tokenizer_config.json").write_text(json.dumps({"add_bos_token": add_bos}), encoding="utf-8")
    tok = Tokenizer(src / "tokenizer.model")
    assert tok.add_bos is (add_bos is not False)
    out = render(tok, TWO_ROUNDS)
    assert (out.ids[0] == tok.bos_id) is tok.add_bos
    config = ModelConfig(
        vocab_size=400,
        hidden_size=8,
        intermediate_size=8,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
    )
    write_checkpoint(tmp_path / "ckpt", config_to_hf(config), [], tokenizer=tok)
    assert Tokenizer(tmp_path / "ckpt" / "tokenizer.model").add_bos is tok.add_bos  # the setting travels
    hf = AutoTokenizer.from_pretrained(tmp_path / "ckpt")
    official = hf(SYSTEM, add_special_tokens=True)["input_ids"]
    for m in TWO_ROUNDS:
        tag = PATIENT_TAG if m["role"] == "user" else DOCTOR_TAG
        official += hf(tag + m["content"] + " ", add_special_tokens=False)["input_ids"]
        official += [tok.eos_id] * (m["role"] == "assistant")
    assert out.ids == official
    ids = hf.apply_chat_template(TWO_ROUNDS[:1], add_generation_prompt=True, tokenize=True, return_dict=True)
    assert (ids["input_ids"][0] == tok.bos_id) is tok.add_bos  # the demo's string, <s> as its tokenizer adds it


def test_generation_prompt_for_each_round_is_the_training_prefix(tok):
    full = render(tok, TWO_ROUNDS)
    answers = [i for i, lab in enumerate(full.labels) if lab != IGNORE_INDEX]
    tag = len(tok.encode(DOCTOR_TAG))
    starts = [
        answers[0] + tag,
        next(i for i in answers if i > answers[0] + len(doctor_turn(tok, "有没有发烧？"))) + tag,
    ]
    for k, start in enumerate(starts):
        prompt = render(tok, TWO_ROUNDS[: 2 * k + 1])
        assert prompt.ids == full.ids[:start] and set(prompt.labels) == {IGNORE_INDEX}
    assert pieces(tok, full.ids[starts[0] : starts[0] + len(ANSWER_1)]) == ANSWER_1


def test_truncation_keeps_whole_rounds_only(tok):
    full = render(tok, TWO_ROUNDS)
    first = render(tok, TWO_ROUNDS[:2])
    # Training: one token short of the whole -> the second round is dropped, whole.
    cut = render(tok, TWO_ROUNDS, max_len=len(full.ids) - 1)
    assert cut.ids == first.ids and cut.labels == first.labels and cut.rounds_dropped == 1
    # Not even the first round fits: no example at all rather than a fragment.
    assert render(tok, TWO_ROUNDS, max_len=len(first.ids) - 1) is None
    # A generation prompt drops the oldest rounds; the question must fit whole.
    prompt = render(tok, TWO_ROUNDS[:3])
    short = render(tok, TWO_ROUNDS[:3], max_len=len(prompt.ids) - 1)
    assert short.rounds_dropped == 1 and short.ids == render(tok, TWO_ROUNDS[2:3]).ids
    with pytest.raises(ValueError, match="the question alone takes"):
        render(tok, TWO_ROUNDS[:3], max_len=10)


def test_collate_right_pads(tok):
    a, b = render(tok, TWO_ROUNDS), render(tok, TWO_ROUNDS[:2])
    batch = collate([a, b], pad_id=0)
    n = len(b.ids)
    assert batch["tokens"].shape == (2, len(a.ids))
    assert batch["tokens"][1, n:].eq(0).all() and batch["labels"][1, n:].eq(IGNORE_INDEX).all()
    assert batch["attention_mask"][1].tolist() == [1] * n + [0] * (len(a.ids) - n)
    assert batch["labels"][0].tolist() == a.labels


# -- readers ---------------------------------------------------------------------------------


def write(path: Path, text: str, encoding="utf-8") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text.encode(encoding))
    return path


def test_huatuo_sft_both_ways(tmp_path):
    f = write(
        tmp_path / "huatuo.jsonl",
        json.dumps({"data": ["问：头痛怎么办？", "答：多休息。", "问:还要吃药吗？", "答:不用。"]}, ensure_ascii=False)
        + "\n"
        + json.dumps({"data": ["问：咳嗽", "答：多喝水", "问：谢谢"]}, ensure_ascii=False)
        + "\n",
    )
    report = Report()
    records = list(read_huatuo_sft(f, report=report))
    assert [m["content"] for m in records[0]["messages"]] == ["头痛怎么办？", "多休息。", "还要吃药吗？", "不用。"]
    assert len(records[1]["messages"]) == 2 and report.notes["odd trailing turn dropped"] == 1
    assert f"{f}:2" in report.summary()
    line = json.loads(f.read_text(encoding="utf-8").splitlines()[1])
    assert to_huatuo(records[1]) == {"data": line["data"][:2]}
    again = from_huatuo(to_huatuo(records[0]), "x", id=records[0]["id"])
    assert again["messages"] == records[0]["messages"]


def test_huatuo26m_strings_and_lists(tmp_path):
    f = write(
        tmp_path / "test_datasets.jsonl",
        '{"questions": "胃痛怎么办", "answers": "少食多餐"}\n'
        '{"questions": ["孩子发烧", "别的问法"], "answers": ["物理降温", "别的回答"]}\n'
        '{"questions": "缺答案"}\n',
    )
    with pytest.raises(RecordError, match=r"test_datasets.jsonl:3: missing field 'answers'"):
        list(read_huatuo26m(f))
    report = Report()
    records = list(read_huatuo26m(f, skip_bad=True, report=report))
    assert [r["messages"][1]["content"] for r in records] == ["少食多餐", "物理降温"]
    assert sum(report.skipped.values()) == 1


def cmedqa2_qa(d, questions: str, answers: str, candidates: str) -> list[tuple[str, str]]:
    """(question, answer) pairs read from a cMedQA2 directory written with these CSV bodies."""
    write(d / "question.csv", "question_id,content\n" + questions)
    write(d / "answer.csv", "ans_id,question_id,content\n" + answers)
    write(d / "test_candidates.txt", "question_id,ans_id,cnt,label\n" + candidates)
    return [(r["messages"][0]["content"], r["messages"][1]["content"]) for r in read_cmedqa2(d, split="test")]


def test_cmedqa2(tmp_path):
    d = tmp_path / "cMedQA2"
    assert cmedqa2_qa(
        d,
        "1,头痛怎么办\n2,咳嗽吃什么药\n",
        '10,1,多休息\n11,1,吃止痛药\n12,2,"止咳糖浆, 多喝水"\n',
        "1,11,0,0\n1,10,1,1\n2,12,0,1\n2,10,1,0\n",
    ) == [("头痛怎么办", "多休息"), ("咳嗽吃什么药", "止咳糖浆, 多喝水")]
    write(d / "dev_candidates.txt", "question_id,ans_id,cnt,label\n3,10,0,1\n")
    with pytest.raises(RecordError, match=r"dev_candidates.txt:2: question_id 3 is not in question.csv"):
        list(read_cmedqa2(d, split="dev"))


def test_webmedqa(tmp_path):
    f = write(
        tmp_path / "medQA.test.txt",
        "内科\t0\tq1\t头晕怎么回事\t不知道\n内科\t1\tq1\t头晕怎么回事\t测一下血压\n"
        "儿科\t1\tq2\t宝宝湿疹\t注意保湿\n儿科\t1\tq2\t宝宝湿疹\t第二个金标准答案\n外科\t1\tq3\t只有四列\n",
    )
    with pytest.raises(RecordError, match=r"medQA.test.txt:5: expected 5 tab-separated fields"):
        list(read_webmedqa(f))
    records = list(read_webmedqa(f, skip_bad=True, report=Report()))
    assert [(r["id"], r["messages"][1]["content"], r["meta"]["department"]) for r in records] == [
        ("webmedqa-q1", "测一下血压", "内科"),
        ("webmedqa-q2", "注意保湿", "儿科"),
    ]


MEDDIALOG = """id=1
https://www.haodf.com/doctorteam/flow_team_1.htm

Doctor faculty
消化内科

Description
疾病：
胃痛
病情描述（发病时间、主要症状等）：
饭后胃痛两周，有反酸。
希望获得的帮助：
需要做胃镜吗

Dialogue
病人：
饭后胃痛两周，有反酸。
病人：
吃了奥美拉唑好一点。
医生：
建议做胃镜，查幽门螺杆菌。
病人:谢谢医生
医生:不客气。

id=2
https://www.haodf.com/doctorteam/flow_team_2.htm

Description
病情描述：孩子咳嗽

Dialogue
医生：
你好
病人：孩子咳嗽三天
医生：发烧吗？
病人：不发烧

id=3
https://www.haodf.com/doctorteam/flow_team_3.htm

病情描述：无对话
"""


def test_meddialog_both_colons_and_turn_merging(tmp_path):
    f = write(tmp_path / "2020.txt", MEDDIALOG)
    with pytest.raises(RecordError, match=r"2020.txt:\d+ \(id=3\): neither a 'Description' nor a 'Dialogue' section"):
        list(read_meddialog(f))
    report = Report()
    first, second = read_meddialog(f, skip_bad=True, report=report)
    description = "疾病：胃痛\n病情描述：饭后胃痛两周，有反酸。\n希望获得的帮助：需要做胃镜吗"
    assert [m["content"] for m in first["messages"]] == [
        description + " 饭后胃痛两周，有反酸。 吃了奥美拉唑好一点。",
        "建议做胃镜，查幽门螺杆菌。",
        "谢谢医生",
        "不客气。",
    ]
    assert first["meta"]["department"] == "消化内科"
    assert first["meta"]["description"]["病情描述"] == "饭后胃痛两周，有反酸。"
    # The Description opens the conversation, so the doctor who spoke first answers it.
    assert [m["content"] for m in second["messages"]] == ["病情描述：孩子咳嗽", "你好", "孩子咳嗽三天", "发烧吗？"]
    assert report.notes["final unanswered patient turn dropped"] == 1
    assert sum(report.skipped.values()) == 1
    assert (first["id"], second["id"]) == ("meddialog-2020-1", "meddialog-2020-2")


MEDDIALOG_FOLLOW_UP = """id=1
https://www.haodf.com/doctorteam/flow_team_9.htm

Doctor faculty
皮肤科

Description
病情描述：手上起疹子
Dialogue
医生：多久了？
病人：一周

Description
病情描述：复诊，疹子消了一半
Dialogue
病人：还要继续用药吗
医生：再用一周。

Diagnosis and suggestions
湿疹，外用激素药膏两周。

id=2
https://www.haodf.com/doctorteam/flow_team_10.htm

Description
病情描述：无对话

id=3
https://www.haodf.com/doctorteam/flow_team_11.htm

Description
病情描述：也无对话
"""


def test_meddialog_follow_ups_diagnosis_ids_and_grouped_skips(tmp_path):
    f = write(tmp_path / "2019.txt", MEDDIALOG_FOLLOW_UP)
    report = Report()
    (consult,) = read_meddialog(f, skip_bad=True, report=report)
    assert [m["content"] for m in consult["messages"]] == [
        "病情描述：手上起疹子",
        "多久了？",
        "一周 病情描述：复诊，疹子消了一半 还要继续用药吗",
        "再用一周。",
    ]
    assert consult["meta"]["diagnosis"] == "湿疹，外用激素药膏两周。"
    # A Description with no Dialogue (published so): one reason, counted, not a line per id.
    assert report.skipped == {"a consultation with no dialogue (as published)": 2}
    # Raw ids restart in every file; ours do not collide.
    g = write(tmp_path / "2020.txt", MEDDIALOG)
    ids = [r["id"] for path in (f, g) for r in read_meddialog(path, skip_bad=True, report=Report())]
    assert len(ids) == len(set(ids)) == 3


def test_kuake_and_med_dialog_100(tmp_path):
    f = write(
        tmp_path / "KUAKE-QIC_100.json",
        json.dumps(
            [{"id": "s1", "query": "头痛挂什么科", "label": "就医建议"}, {"id": "s2", "query": "x", "label": "闲聊"}],
            ensure_ascii=False,
        ),
    )
    with pytest.raises(RecordError, match=r"KUAKE-QIC_100.json\[1\]: label '闲聊' is not one of the 11"):
        list(read_kuake_qic(f))
    assert [r["meta"]["label"] for r in read_kuake_qic(f, skip_bad=True, report=Report())] == ["就医建议"]
    g = write(
        tmp_path / "Med-dialog_100.json",
        json.dumps(
            [
                {"id": 7, "medical_case": "男，50岁，胸痛", "doctor_diagnosis": "心绞痛", "Department": "心内科"},
                {"id": 8, "medical_case": "女，20岁", "Department": "内科"},
            ],
            ensure_ascii=False,
        ),
    )
    with pytest.raises(RecordError, match=r"Med-dialog_100.json\[1\]: missing field 'doctor_diagnosis'"):
        list(read(g))
    rec = next(iter(read_med_dialog_100(g)))
    assert rec["messages"] == [{"role": "user", "content": "男，50岁，胸痛"}]
    assert rec["meta"] == {"doctor_diagnosis": "心绞痛", "department": "心内科"}


def test_malformed_lines_name_file_line_and_field(tmp_path):
    good = {
        "id": "a",
        "source": "s",
        "messages": [{"role": "user", "content": "问"}, {"role": "assistant", "content": "答"}],
    }
    bad_role = dict(good, messages=[{"role": "assistant", "content": "答"}])
    f = write(
        tmp_path / "x.jsonl", "\n".join([json.dumps(good), "{oops", json.dumps(bad_role), json.dumps(good)]) + "\n"
    )
    with pytest.raises(RecordError, match=r"x.jsonl:2: not valid JSON"):
        list(read_schema(f))
    report = Report()
    assert len(list(read_schema(f, skip_bad=True, report=report))) == 2
    assert sum(report.skipped.values()) == 2 and "x.jsonl:3" in report.summary()
    assert "messages[0].role is 'assistant'" in report.summary()


def test_encodings(tmp_path):
    rec = {
        "id": "a",
        "source": "s",
        "messages": [{"role": "user", "content": "头痛"}, {"role": "assistant", "content": "休息"}],
    }
    line = json.dumps(rec, ensure_ascii=False) + "\n"
    bom = write(tmp_path / "bom.jsonl", "\ufeff" + line)
    assert next(iter(read_schema(bom)))["messages"][0]["content"] == "头痛"
    gbk = write(tmp_path / "gbk.jsonl", line, encoding="gbk")
    with pytest.raises(RecordError, match=r"gbk.jsonl:1: not valid utf-8.*--encoding gbk"):
        list(read_schema(gbk))
    assert next(iter(read_schema(gbk, encoding="gbk")))["messages"][1]["content"] == "休息"


# -- mixing and batching ---------------------------------------------------------------------


def conv(i, text):
    return {
        "id": f"r{i}",
        "source": "s",
        "messages": [{"role": "user", "content": text}, {"role": "assistant", "content": "答"}],
    }


def test_mix_is_deterministic_and_deduplicates():
    a = [conv(i, f"问题{i}") for i in range(40)] + [conv(99, "问题3")]  # a duplicate within the source
    b = [conv(100 + i, f"其他{i}") for i in range(20)] + [conv(200, "问题 ３！")]  # full-width twin of 问题3
    assert normalise("问题 ３！") == normalise("问题3")

    def run(seed):
        return mix([Source("a", a, cap=30), Source("b", b, weight=2.5)], seed=seed, val_fraction=0.1)

    train, val, rows = run(0)
    assert run(0) == (train, val, rows) and run(1)[0] != train
    assert rows[0] == {"source": "a", "read": 41, "duplicates": 1, "capped": 10, "val": 3, "train": 27}
    assert rows[1] == {"source": "b", "read": 21, "duplicates": 1, "capped": 0, "val": 2, "train": 45}
    assert not {r["id"] for r in val} & {r["id"] for r in train}  # upsampling happens after the split
    # The split depends on the seed and the sources' order, never on their names (paths).
    moved = mix([Source("/elsewhere/a", a, cap=30), Source("/elsewhere/b", b, weight=2.5)], seed=0, val_fraction=0.1)
    assert moved[:2] == (train, val)


def test_batches_cover_each_epoch_and_group_lengths():
    lengths = [((i * 37) % 101) + 1 for i in range(200)]
    sampler = LengthGroupedBatches(lengths, 8, seed=3, group_batches=5)
    epoch = sampler.epoch_batches(0)
    assert sorted(i for b in epoch for i in b) == list(range(200))
    assert epoch != sampler.epoch_batches(1)

    def spread(batches):
        return sum(max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in batches) / len(batches)

    unsorted = [list(range(200))[k : k + 8] for k in range(0, 200, 8)]  # lengths in arbitrary order
    assert spread(epoch) < 0.4 * spread(unsorted)


def test_sampler_state_round_trip():
    lengths = list(range(1, 51))
    a = LengthGroupedBatches(lengths, 4, seed=7)
    it = iter(a)
    [next(it) for _ in range(17)]  # into the second epoch (13 batches an epoch)
    state = a.state_dict()
    expected = [next(it) for _ in range(20)]
    b = LengthGroupedBatches(lengths, 4, seed=7)
    b.load_state_dict(state)
    assert [x for _, x in zip(range(20), iter(b))] == expected
    with pytest.raises(ValueError, match="batch_size=4, this run has 5"):
        LengthGroupedBatches(lengths, 5, seed=7).load_state_dict(state)


# -- the shipped corpus and the command line --------------------------------------------------


def test_shipped_corpus_reads_and_is_complete():
    sft = {f.stem: list(read(f)) for f in sorted((DATA / "sft").glob("*.jsonl"))}
    assert {r["source"] for rs in sft.values() for r in rs} == {
        "distilled_instruction",
        "real_instruction",
        "distilled_conversation",
        "real_conversation",
    }
    pairs = list(read_pairs(DATA / "preference" / "preference_pairs.jsonl"))
    qic = list(read(DATA / "eval" / "kuake_qic_small.json"))
    cases = list(read(DATA / "eval" / "med_dialog_small.json"))
    qa = list(read(DATA / "eval" / "qa_test.jsonl"))
    assert {r["meta"]["label"] for r in qic} == set(KUAKE_QIC_LABELS) - {"其他"}  # the 10 intents
    assert all(r["meta"]["doctor_diagnosis"] and r["meta"]["department"] for r in cases)
    everything = [r for rs in sft.values() for r in rs] + pairs + qic + cases + qa
    assert len(everything) >= 220
    ids = [r["id"] for rs in sft.values() for r in rs] + [r["id"] for r in pairs]
    assert len(ids) == len(set(ids))
    sft_all = [r for rs in sft.values() for r in rs]
    assert len(mix([Source("all", sft_all)], val_fraction=0)[0]) == len(sft_all)  # no duplicates


def test_cli_convert_and_stats(tmp_path, capsys, tokenizer_file):
    f = write(tmp_path / "medQA.valid.txt", "内科\t1\tq1\t头晕怎么回事\t测一下血压\n内科\t1\tq2\t坏\n")
    assert data_cli(["convert", str(f), "--out", str(tmp_path / "o.jsonl")]) == 2
    assert "medQA.valid.txt:2: expected 5" in capsys.readouterr().err
    assert not (tmp_path / "o.jsonl").exists()  # nothing half-written
    assert data_cli(["convert", str(f), "--out", str(tmp_path / "o.jsonl"), "--skip-bad"]) == 0
    assert "wrote 1 records" in capsys.readouterr().out
    assert data_cli(["stats", str(tmp_path / "o.jsonl"), "--tokenizer", str(tokenizer_file)]) == 0
    assert "1 records" in capsys.readouterr().out


@pytest.mark.parametrize(
    "src, name", [("kuake_qic_small.json", "kuake_qic_100.jsonl"), ("med_dialog_small.json", "med_dialog_100.jsonl")]
)
def test_converted_files_read_back_whatever_their_name(tmp_path, src, name, capsys):
    out = tmp_path / name  # the names the README's convert commands write
    assert data_cli(["convert", str(DATA / "eval" / src), "--out", str(out)]) in (0, None)
    records = list(read(out))
    assert records and records == list(read_schema(out))
    assert data_cli(["stats", str(out)]) in (0, None)


def test_alpaca_and_sharegpt_as_published(tmp_path):
    # Chinese Alpaca (App. E): a JSON list of instruction / input / output.
    alpaca = write(
        tmp_path / "alpaca_gpt4_data_zh.json",
        json.dumps(
            [
                {"instruction": "把下面的句子翻译成英文。", "input": "我头痛。", "output": "I have a headache."},
                {"instruction": "给出三条保持健康的建议。", "input": "", "output": "1. 均衡饮食……"},
                {"instruction": "空回答", "input": "", "output": ""},
            ],
            ensure_ascii=False,
            indent=2,
        ),
    )
    report = Report()
    first, second = read(alpaca, skip_bad=True, report=report)
    assert (
        first["messages"][0]["content"] == "把下面的句子翻译成英文。\n我头痛。"
        and second["messages"][0]["content"] == "给出三条保持健康的建议。"
    )
    assert first["messages"][1]["content"] == "I have a headache." and first["source"] == "general_instruction"
    assert sum(report.skipped.values()) == 1
    # ShareGPT (philschmid/sharegpt-raw): conversations of human / gpt turns, list or lines.
    rows = [
        {
            "id": "a1",
            "conversations": [
                {"from": "gpt", "value": "Hi!"},
                {"from": "human", "value": "发烧怎么办"},
                {"from": "human", "value": "38.5度"},
                {"from": "gpt", "value": "多喝水"},
                {"from": "human", "value": "谢谢"},
            ],
        },
        {
            "id": "a2",
            "conversations": [
                {"from": "system", "value": "你是助手"},
                {"from": "human", "value": "你好"},
                {"from": "gpt", "value": "你好！"},
            ],
        },
        {"id": "a3", "conversations": [{"from": "bot", "value": "?"}]},
    ]
    for name, text in (
        ("sharegpt.json", json.dumps(rows, ensure_ascii=False, indent=1)),
        ("sharegpt.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)),
    ):
        report = Report()
        a1, a2 = read(write(tmp_path / name, text), skip_bad=True, report=report)
        assert [m["content"] for m in a1["messages"]] == ["发烧怎么办\n38.5度", "多喝水"]
        assert [m["role"] for m in a2["messages"]] == ["user", "assistant"] and a1["source"] == "general_conversation"
        assert sum(report.notes.values()) == 4 and sum(report.skipped.values()) == 1, report.summary()
        assert "expected human or gpt" in report.summary()


def test_cmedqa2_and_webmedqa_fields_as_published(tmp_path):
    d = tmp_path / "cMedQA2"
    # An unquoted comma inside the free-text content; a quoted content over three lines.
    assert cmedqa2_qa(
        d,
        '1,头痛，发热,还咳嗽怎么办\n2,"孩子咳嗽\n晚上更重\n怎么办"\n3,胃痛\n',
        '10,1,多休息,多喝水\n12,2,"止咳糖浆, 多喝水"\n13,3,少食多餐\n',
        "1,10,0,1\n2,12,0,1\n3,13,0,1\n",
    ) == [
        ("头痛，发热,还咳嗽怎么办", "多休息,多喝水"),
        ("孩子咳嗽\n晚上更重\n怎么办", "止咳糖浆, 多喝水"),
        ("胃痛", "少食多餐"),
    ]
    # Errors still name the line a row starts on, after a multi-line row too.
    write(d / "question.csv", 'question_id,content\n2,"孩子咳嗽\n晚上更重"\n3\n')
    with pytest.raises(RecordError, match=r"question.csv:4: expected 2 fields"):
        list(read_cmedqa2(d, split="test"))
    f = write(tmp_path / "medQA.test.txt", "内科\t1\tq1\t头晕怎么回事\t测一下血压\t再看一次\n")
    assert list(read_webmedqa(f))[0]["messages"][1]["content"] == "测一下血压\t再看一次"


def test_export_and_mix_count_prompt_only_records(tmp_path, capsys):
    q, a = {"role": "user", "content": "头痛"}, {"role": "assistant", "content": "多休息"}
    rows = [
        {"id": "qa", "source": "t", "messages": [q, a]},
        {"id": "open", "source": "t", "messages": [q, a, q]},
        {"id": "prompt", "source": "t", "messages": [{"role": "user", "content": "咳嗽怎么办"}]},
    ]
    f = write(tmp_path / "in.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    assert data_cli(["export-huatuo", str(f), "--out", str(tmp_path / "huatuo.jsonl")]) == 0
    printed = capsys.readouterr().out
    assert "wrote 2 lines" in printed and "a question with no answer" in printed and "last unanswered" in printed
    assert [len(r["messages"]) for r in read_huatuo_sft(tmp_path / "huatuo.jsonl")] == [2, 2]  # reads back
    assert data_cli(["mix", "--source", str(f), "--out-dir", str(tmp_path / "mix"), "--val-fraction", "0"]) == 0
    assert "2 x record ends with a question" in capsys.readouterr().out


def test_mix_token_columns_count_what_is_written(tmp_path, tokenizer_file, capsys):
    q, a = {"role": "user", "content": "头痛"}, {"role": "assistant", "content": "多休息"}
    rows = [{"id": f"r{i}", "source": "t", "messages": [dict(q, content=f"头痛{i}天"), a]} for i in range(4)]
    rows.append(dict(rows[0], id="dup"))  # a duplicate: read, not written
    f = write(tmp_path / "in.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    from data.template import render

    one = len(render(Tokenizer(tokenizer_file), rows[0]["messages"]).ids)
    assert (
        data_cli(
            [
                "mix",
                "--source",
                f"{f}:cap=2:weight=2",
                "--out-dir",
                str(tmp_path / "m"),
                "--val-fraction",
                "0",
                "--tokenizer",
                str(tokenizer_file),
            ]
        )
        == 0
    )
    table = capsys.readouterr().out.splitlines()
    row = dict(zip(table[0].split(), table[1].split()))
    assert (row["read"], row["train"]) == ("5", "4")  # 2 kept, each twice
    assert abs(int(row["tokens"]) - 4 * one) <= 4  # four written records of about one length, not five read


def test_gbk_files_are_read_wherever_data_is_read(tmp_path, capsys):
    """Issue 12: convert --encoding gbk still failed (the format was guessed from UTF-8), and the
    trainers and evaluate had no --encoding at all although their errors advised it."""
    from data.__main__ import main as data_main
    import evaluate
    import train_rm
    import train_sft
    from data.corpus import read_sources

    rows = [
        {
            "id": f"g{i}",
            "source": "gbk",
            "messages": [
                {"role": "user", "content": f"我头痛{i}天了，怎么办？"},
                {"role": "assistant", "content": "建议您多休息。"},
            ],
        }
        for i in range(3)
    ]
    gbk = tmp_path / "gbk.jsonl"
    gbk.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="gbk")
    assert data_main(["convert", str(gbk), "--out", str(tmp_path / "a.jsonl")]) == 2
    assert "try --encoding gbk" in capsys.readouterr().err
    assert data_main(["convert", str(gbk), "--out", str(tmp_path / "a.jsonl"), "--encoding", "gbk"]) == 0
    assert [r["messages"] for r in read_schema(tmp_path / "a.jsonl")] == [r["messages"] for r in rows]
    sources = read_sources([gbk], Report(), None, "gbk")
    assert [r["messages"] for r in sources[0].records] == [r["messages"] for r in rows]
    # Every command that reads data files takes --encoding (and --format where the format varies).
    for main, argv, flags in (
        (train_sft.main, [], ("--encoding", "--format")),
        (train_rm.main, [], ("--encoding",)),
        (train_rm.main, ["sample"], ("--encoding", "--format")),
        (evaluate.main, ["bench"], ("--encoding", "--format")),
        (evaluate.main, ["consult"], ("--encoding", "--format")),
    ):
        with pytest.raises(SystemExit) as e:
            main([*argv, "--help"])
        printed = capsys.readouterr().out
        assert e.value.code == 0 and all(f in printed for f in flags), (argv, printed)


COVID_DIALOGUE = """id=53
https://www.haodf.com/wenda/a_53.htm

Description
疾病：
发热咳嗽
病情描述（发病时间、主要症状等）：
发热两天，干咳。
希望获得的帮助：
需要做核酸吗

Dialogue
病人：
发热两天，干咳。
医生：
建议到发热门诊做核酸检测。

id=54
https://www.haodf.com/wenda/a_54.htm

Description
疾病：
肺炎
病情描述（发病时间、主要症状等）：
咳嗽一周，有痰。
希望获得的帮助：
是不是新冠

Dialogue
病人：
咳嗽一周，有痰。
病人：
今天开始低烧。
病人：
医生在吗？

"""


def test_consultations_no_doctor_answered_are_left_out_and_counted(tmp_path, capsys):
    """Issue 21: the published COVID-Dialogue / MedDialog-CN files hold consultations the doctor
    never answered (id=54 of COVID-Dialogue's Chinese file: a Description and three patient
    turns); convert stopped on the first with exit 2 unless --skip-bad."""
    from safety import run_main

    f = write(tmp_path / "COVID-Dialogue-Dataset-Chinese.txt", COVID_DIALOGUE)
    report = Report()
    (answered,) = read_meddialog(f, report=report)  # not skip_bad: nothing here is malformed
    assert answered["id"] == "meddialog-COVID-Dialogue-Dataset-Chinese-53"
    assert report.skipped == {"a consultation no doctor answered (as published)": 1}
    assert "(id=54)" in report.summary()
    out = tmp_path / "covid.jsonl"
    assert run_main(data_cli, ["convert", str(f), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "wrote 1 records" in printed and "skipped 1 record(s): a consultation no doctor answered" in printed
    # What is malformed still stops the conversion, with the file and line.
    g = write(
        tmp_path / "2020.txt", COVID_DIALOGUE + "id=55\nhttps://www.haodf.com/wenda/a_55.htm\n\n病情描述：头痛\n"
    )  # no section at all
    assert run_main(data_cli, ["convert", str(g), "--out", str(tmp_path / "b.jsonl")]) == 2
    err = capsys.readouterr().err
    assert "2020.txt:" in err and "(id=55): neither a 'Description' nor a 'Dialogue' section" in err, err
    assert not (tmp_path / "b.jsonl").exists()


# Issue 31: COVID-Dialogue's Chinese file, as published, also holds consultations with a
# Description and no Dialogue section (74 of its 1,393; id=122 the first, between two ordinary
# ones). The layout is the file's: fields with full-width colons and inline values, the
# "(date 填写)" suffix, a blank line before the next id. The text is ours.
NO_DIALOGUE = """id=121
https://www.haodf.com/doctorteam/flow_team_1_1.htm

Description
疾病： 咳嗽
病情描述： 咳嗽五天，夜里加重。
希望获得的帮助： 要不要拍胸片
患病多久： 一周内
过敏史： 无（2020-02-01填写）

Dialogue
医生：
咳嗽五天伴夜间加重，先查血常规。
病人：
好的，谢谢医生。

Diagnosis and suggestions
病情摘要及初步印象： 上呼吸道感染

id=122
https://www.haodf.com/doctorteam/flow_team_2_1.htm

Description
疾病： 肺炎
病情描述： 胸闷气短两天，没有发烧。
希望获得的帮助： 我该怎么办？
患病多久： 一月内
过敏史： 无（2020-02-02填写）
既往病史： 无（2020-02-02填写）

id=123
https://www.haodf.com/doctorteam/flow_team_3_1.htm

Description
疾病： 发热
病情描述： 低烧三天。
希望获得的帮助： 需要去医院吗

Dialogue
病人：
低烧三天。
医生：
建议去发热门诊。

"""


def test_a_consultation_with_no_dialogue_is_left_out_and_counted(tmp_path, capsys):
    from safety import run_main

    f = write(tmp_path / "COVID-Dialogue-Dataset-Chinese.txt", NO_DIALOGUE)
    report = Report()
    got = list(read_meddialog(f, report=report))  # not skip_bad: nothing here is malformed
    assert [r["id"] for r in got] == [
        "meddialog-COVID-Dialogue-Dataset-Chinese-121",
        "meddialog-COVID-Dialogue-Dataset-Chinese-123",
    ]
    assert got[0]["messages"][-1] == {"role": "assistant", "content": "咳嗽五天伴夜间加重，先查血常规。"}
    assert report.skipped == {"a consultation with no dialogue (as published)": 1}
    assert f"{f}:20 (id=122)" in report.summary()  # the file and line of its id=
    out = tmp_path / "covid.jsonl"
    assert run_main(data_cli, ["convert", str(f), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "wrote 2 records" in printed and "skipped 1 record(s): a consultation with no dialogue" in printed
    assert len(list(read_schema(out))) == 2


def test_an_existing_output_is_replaced_only_with_overwrite(tmp_path, capsys):
    """Issue 21: `python -m data convert … --out X` replaced X without a word, where the trainers
    refuse; one rule everywhere: refused, naming it, unless --overwrite, which says what it replaces."""
    from safety import run_main

    f = write(tmp_path / "medQA.valid.txt", "内科\t1\tq1\t头晕怎么回事\t测一下血压\n")
    out = write(tmp_path / "o.jsonl", "mine\n")
    assert run_main(data_cli, ["convert", str(f), "--out", str(out)]) == 2
    assert capsys.readouterr().err.strip() == (
        f"error: {tmp_path} holds an earlier output (o.jsonl): add --overwrite to replace it, or choose another --out"
    )
    assert out.read_text() == "mine\n"
    assert run_main(data_cli, ["convert", str(f), "--out", str(out), "--overwrite"]) == 0
    assert f"--overwrite: replacing o.jsonl in {tmp_path}" in capsys.readouterr().out
    assert len(list(read_schema(out))) == 1
    (tmp_path / "mix").mkdir()
    write(tmp_path / "mix" / "val.jsonl", "")
    assert run_main(data_cli, ["mix", "--source", str(out), "--out-dir", str(tmp_path / "mix")]) == 2
    assert "holds an earlier output (val.jsonl)" in capsys.readouterr().err
    assert run_main(data_cli, ["export-huatuo", str(out), "--out", str(out)]) == 2
    assert out.read_text().count("\n") == 1


def test_no_command_writes_over_its_own_input_and_a_link_loop_is_an_earlier_output(tmp_path, capsys):
    """Issue 35 item 2: mix --out-dir holding its --source, export-huatuo and convert with --out
    = the input, all with --overwrite, replaced what they were reading; a symlink loop as --out
    was replaced without --overwrite (Path.exists() is False for a loop). Each is refused now,
    by any name of the input (itself, a link, a hard link), and the input is unchanged."""
    import convert
    import distill
    from safety import run_main

    rows = [
        {
            "id": f"r{i}",
            "source": "t",
            "messages": [{"role": "user", "content": f"头痛{i}天"}, {"role": "assistant", "content": "多休息。"}],
        }
        for i in range(5)
    ]
    d = tmp_path / "d"
    d.mkdir()
    x = d / "train.jsonl"
    x.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    before = x.read_bytes()
    (d / "link.jsonl").symlink_to(x)
    os.link(x, d / "hard.jsonl")
    for argv in (
        ["mix", "--source", str(x), "--out-dir", str(d), "--overwrite"],
        ["export-huatuo", str(x), "--out", str(x), "--overwrite"],
        ["convert", str(x), "--out", str(x), "--overwrite"],
        ["convert", str(x), "--out", str(d / "link.jsonl"), "--overwrite"],
        ["convert", str(d / "link.jsonl"), "--out", str(d / "hard.jsonl"), "--overwrite"],
    ):
        assert run_main(data_cli, argv) == 2, argv
        assert "an input of this command" in capsys.readouterr().err
    assert x.read_bytes() == before
    with pytest.raises(SystemExit, match="an input of this command"):
        distill.main(["polish-qa", "--input", str(x), "--out", str(d / "link.jsonl"), "--model", "m"])
    with pytest.raises(SystemExit, match="a directory holding an input"):
        convert.main(["--src", str(d), "--out", str(tmp_path), "--overwrite"])
    assert x.read_bytes() == before
    (tmp_path / "loop1").symlink_to(tmp_path / "loop2")
    (tmp_path / "loop2").symlink_to(tmp_path / "loop1")
    assert run_main(data_cli, ["convert", str(x), "--out", str(tmp_path / "loop1")]) == 2
    assert "holds an earlier output (loop1)" in capsys.readouterr().err
    assert os.readlink(tmp_path / "loop1") == str(tmp_path / "loop2")


def test_messages_name_the_line_the_flag_and_the_path_the_user_gave(tmp_path, capsys, monkeypatch):
    """Issue 35 item 4, each a row that pointed the wrong way: a GBK line after a UTF-8 one was
    blamed on line 1 "at byte 688" (a byte offset into the file) and refused under --skip-bad;
    weight=abc said only "could not convert string to float"; weight=-1 and an empty
    export-huatuo input wrote 0 records with exit 0; --out /proc/x.jsonl named the temporary
    file; Ctrl-C in convert.py ended in a KeyboardInterrupt traceback."""
    import convert
    import checkpoint
    from conftest import micro_model
    from safety import run_main

    def record(i, text):
        return json.dumps(
            {
                "id": f"r{i}",
                "source": "t",
                "messages": [{"role": "user", "content": text}, {"role": "assistant", "content": "多休息。"}],
            },
            ensure_ascii=False,
        )

    mixed = tmp_path / "mixed.jsonl"
    line1 = record(1, "头痛三天了").encode()
    mixed.write_bytes(line1 + b"\n" + record(2, "发烧了").encode("gbk") + b"\n" + record(3, "咳嗽").encode() + b"\n")
    bad = len(b'{"id": "r2", "source": "t", "messages": [{"role": "user", "content": "') + 1  # 1-based
    assert run_main(data_cli, ["stats", str(mixed)]) == 2
    assert f"mixed.jsonl:2: not valid utf-8: invalid start byte at byte {bad} of the line" in capsys.readouterr().err
    assert run_main(data_cli, ["stats", str(mixed), "--skip-bad"]) == 0
    out = capsys.readouterr().out
    assert "mixed.jsonl: 2 records" in out and "skipped 1 record(s): not valid utf-8" in out and "mixed.jsonl:2)" in out

    good = tmp_path / "good.jsonl"
    good.write_text(record(1, "头痛") + "\n" + record(2, "发烧") + "\n", encoding="utf-8")
    for option, says in (
        ("weight=abc", "weight: 'abc' is not a number > 0"),
        ("weight=-1", "weight: -1 is out of range: it must be a number > 0"),
        ("weight=nan", "weight: nan is not a number > 0"),
        ("cap=0", "cap: 0 is out of range"),
    ):
        assert run_main(data_cli, ["mix", "--source", f"{good}:{option}", "--out-dir", str(tmp_path / "m")]) == 2
        assert f"error: --source {good}:{option}: {says}" in capsys.readouterr().err
    assert not (tmp_path / "m").exists()

    (tmp_path / "empty.jsonl").write_text("", encoding="utf-8")
    (tmp_path / "earlier.jsonl").write_text("kept\n", encoding="utf-8")
    assert (
        run_main(
            data_cli,
            ["export-huatuo", str(tmp_path / "empty.jsonl"), "--out", str(tmp_path / "earlier.jsonl"), "--overwrite"],
        )
        == 2
    )
    assert "empty.jsonl: no conversation to export; nothing written" in capsys.readouterr().err
    assert (tmp_path / "earlier.jsonl").read_text(encoding="utf-8") == "kept\n"  # what the user had stays
    assert sorted(p.name for p in tmp_path.iterdir()) == ["earlier.jsonl", "empty.jsonl", "good.jsonl", "mixed.jsonl"]

    if Path("/proc/self").is_dir():  # a directory no file can be made in
        assert run_main(data_cli, ["convert", str(good), "--out", "/proc/x.jsonl"]) == 2
        err = capsys.readouterr().err
        assert "'/proc/x.jsonl'" in err and ".tmp-" not in err

    def interrupted(*a, **kw):
        raise KeyboardInterrupt

    src = micro_model()
    monkeypatch.setattr(checkpoint, "_save_shard", interrupted)  # Ctrl-C while the first shard is written
    assert run_main(convert.main, ["--src", str(src), "--out", str(tmp_path / "c")]) == 130
    assert capsys.readouterr().err == "error: interrupted\n"
    assert not (tmp_path / "c").exists() and not any(p.name.startswith(".") for p in tmp_path.iterdir())


# -- the rendered corpus cache (data/corpus.py), reliability round 5 (issue 44) ----------------------------


def prompts_build(n: int = 50):
    """An entry's build: n prompts of ids (a corpus of prompts, PPO's), and no report."""
    return lambda: ({"prompts": ([i % 7 + 3] * (i % 5 + 1) for i in range(n))}, None)


def test_a_cache_entry_damaged_in_place_is_named_and_rendered_again(tmp_path):
    """Issue 44 item 3: a token file damaged in place (same size: a bad sector, another tool's
    write) was taken as the rendered data; the run trained on the wrong tokens, or died with an
    IndexError. Now the digests written with the entry are checked when it is opened."""
    from data import corpus

    entry, said = tmp_path / "cache" / "e", []
    first = corpus.ensure_entry(entry, {"k": 1}, prompts_build(), labels=False, say=said.append)
    expected = [list(x) for x in corpus.Corpus(entry / "prompts")]
    ids = entry / "prompts" / "ids.int32"
    data = bytearray(ids.read_bytes())
    data[8:12] = (10**6).to_bytes(4, "little")  # an id far out of the vocabulary, same size
    ids.write_bytes(bytes(data))
    assert corpus.complete(entry, verify=False) == first  # its sizes alone cannot tell
    with pytest.raises(corpus.Damaged, match=f"^{ids}: its contents are not what was written"):
        corpus.complete(entry)
    said.clear()
    assert corpus.ensure_entry(entry, {"k": 1}, prompts_build(), labels=False, say=said.append) == first
    assert said == [
        f"{ids}: its contents are not what was written (sha256 differs): rendering the entry again",
        f"rendering the data into {entry} (once: a rerun maps it)",
    ]
    assert [list(x) for x in corpus.Corpus(entry / "prompts")] == expected


def build_together(cache: str, rounds: int, barrier, results):
    """One of two builders: each round both ensure the same fresh entry at the same moment."""
    from data import corpus

    for r in range(rounds):
        barrier.wait(timeout=60)
        said = []
        try:
            meta = corpus.ensure_entry(Path(cache) / str(r) / "e", {"r": r}, prompts_build(), False, said.append)
            results.put((r, "rendering" in said[-1], meta["prompts"]["items"]))
        except Exception as e:  # noqa: BLE001 - reported to the test, which fails on it
            results.put((r, "error", f"{type(e).__name__}: {e}"))


def test_two_runs_building_the_same_cache_entry_at_once_both_get_it_whole(tmp_path):
    """Issue 44 item 3: two runs sharing --data-cache that built one entry at once: one removed
    the entry the other had just placed, or failed renaming onto it (ENOTEMPTY). Now the entry's
    lock makes one render it and the other take it. Two processes start together 60 times, each
    time on a fresh entry (bounded: a minute at most)."""
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    rounds, barrier, results = 60, context.Barrier(2), context.Queue()
    workers = [context.Process(target=build_together, args=(str(tmp_path), rounds, barrier, results)) for _ in range(2)]
    for w in workers:
        w.start()
    try:
        outcomes = [results.get(timeout=120) for _ in range(2 * rounds)]
    finally:
        for w in workers:
            w.join(timeout=30)
            w.kill()
    assert [o for o in outcomes if o[1] == "error"] == []
    for r in range(rounds):
        mine = [o for o in outcomes if o[0] == r]
        assert sorted(o[1] for o in mine) == [False, True] and all(o[2] == 50 for o in mine)  # rendered once
    from data import corpus

    assert all(corpus.complete(tmp_path / str(r) / "e") for r in range(rounds))
    assert not list(tmp_path.glob("*/.e.tmp-*")) and not list(tmp_path.glob("*/.e.old-*"))
