"""The sentencepiece wrapper and the training of a small LLaMA-style tokenizer."""

from pathlib import Path

import pytest
from conftest import CORPUS

from tokenizer import StreamDecoder, Tokenizer, corpus_sentences, train_tokenizer
from pretrained import save_model


def test_special_ids_and_round_trip(tokenizer_file):
    tok = Tokenizer(tokenizer_file)
    assert (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 1, 2)  # LLaMA's and Ziya's ids
    # Unseen characters (byte fallback), digits, Latin and an emoji all survive a round trip.
    for text in CORPUS[:8] + ["罕见字：龘靐 and ASCII 12345 😀"]:
        ids = tok.encode(text, bos=True, eos=True)
        assert ids[0] == 1 and ids[-1] == 2 and 0 not in ids[1:-1]  # never <unk>
        assert tok.decode(ids) == text
    # Digits are split one by one (LLaMA's split_digits), though "38.5" recurs in the corpus.
    pieces = [tok.sp.id_to_piece(i) for i in tok.encode("体温38.5度，血压140/90")]
    assert all(sum(c.isdigit() for c in p) <= 1 for p in pieces), pieces


def test_embedding_may_be_larger_than_the_tokenizer(tokenizer_file):
    tok = Tokenizer(tokenizer_file)
    assert tok.decode(tok.encode("头痛") + [len(tok), len(tok) + 13]) == "头痛"
    tok.check_model_vocab(len(tok) + 14)  # Ziya: 39,424 rows for 39,410 pieces
    with pytest.raises(ValueError, match=f"tokenizer has {len(tok)} pieces but the model embeds only"):
        tok.check_model_vocab(len(tok) - 1)


def test_stream_decoder_reassembles_text(tokenizer_file):
    tok = Tokenizer(tokenizer_file)
    text = "孩子发烧😀38.5度 ok"
    dec = StreamDecoder(tok)
    pieces = [dec.push(i) for i in tok.encode(text)]
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)  # never half a character


def stream(tok, ids) -> list[str]:
    dec = StreamDecoder(tok)
    return [dec.push(i) for i in ids] + [dec.flush()]


def test_stream_decoder_equals_decoding_the_whole_reply_on_random_replies(tokenizer_file):
    """The streamed pieces add up to decode(ids), and none holds half a character, on replies
    a model could write: random runs of text (rare characters that fall back to bytes, emoji,
    digits, spaces, Latin) and random ids of the whole vocabulary, special ids included."""
    import random

    tok = Tokenizer(tokenizer_file)
    pool = list("孩子发烧咳嗽头痛医生建议多喝水龘靐😀🩺 ，。？\n0123456789abc ") + ["  ", "体温38.5度"]
    rng = random.Random(0)
    for trial in range(300):
        if trial % 3:
            ids = tok.encode("".join(rng.choice(pool) for _ in range(rng.randint(1, 60))))
        else:
            ids = [rng.randrange(len(tok)) for _ in range(rng.randint(1, 40))]
        pieces = stream(tok, ids)
        assert "".join(pieces) == tok.decode(ids), ids
        if trial % 3:  # valid UTF-8 throughout: no piece may split a character
            assert all("\ufffd" not in p for p in pieces), (ids, pieces)


def test_stream_decoder_decodes_a_window_not_the_reply(tokenizer_file, monkeypatch):
    """Each token decodes the few tokens since the last two emissions, not the whole reply:
    before, a reply of n tokens decoded n(n+1)/2 ids (500 tokens: 125,250), an O(n²) reply."""
    tok = Tokenizer(tokenizer_file)
    ids = tok.encode("孩子发烧😀38.5度，医生建议多喝水。" * 40)
    assert len(ids) > 300
    decoded, decode = [], tok.decode
    monkeypatch.setattr(tok, "decode", lambda part: decoded.append(len(part)) or decode(part))
    assert "".join(stream(tok, ids)) == decode(ids)
    assert sum(decoded) < 10 * len(ids), (sum(decoded), len(ids))


def test_training_is_deterministic(tmp_path, tokenizer_file):
    train_tokenizer(CORPUS, tmp_path / "again.model", vocab_size=400)
    assert (tmp_path / "again.model").read_bytes() == tokenizer_file.read_bytes()


def test_corpus_reader_and_bad_files(tmp_path):
    f = tmp_path / "c.jsonl"
    f.write_text(
        '{"id": "a", "source": "x", "messages": [{"role": "user", "content": "头痛"}]}\n\n{bad\n', encoding="utf-8"
    )
    with pytest.raises(ValueError, match=r"c.jsonl:3: not valid JSON"):
        list(corpus_sentences([f]))
    assert next(corpus_sentences([f])) == "头痛"
    with pytest.raises(FileNotFoundError, match="no sentencepiece model"):
        Tokenizer(tmp_path / "missing.model")
    (tmp_path / "bad.model").write_bytes(b"not a model")
    with pytest.raises(ValueError, match="bad.model: not a sentencepiece model"):
        Tokenizer(tmp_path / "bad.model")


MIXED = [
    "头痛发热三天了，需要去医院吗？",
    "孩子咳嗽 晚上更重",
    "Aspirin 100mg qd, 监测血压",
    "  两个空格\n换行\t制表",
    "血糖 6.8 mmol/L 😷",
    "ＡＢＣ①全角",
    "",
]


def medical_texts() -> list[str]:
    """The texts this project ships (data/sft, data/eval): questions and answers as published."""
    import json

    from tokenizer import _strings

    root = Path(__file__).resolve().parent.parent / "data"
    texts = list(corpus_sentences(sorted((root / "sft").glob("*.jsonl")) + [root / "eval" / "qa_test.jsonl"]))
    for f in sorted((root / "eval").glob("*.json")):
        texts += list(_strings(json.loads(f.read_text(encoding="utf-8"))))
    return texts + MIXED


def test_tokenizer_json_gives_sentencepieces_ids_for_a_trained_vocabulary(tmp_path, tokenizer_file):
    """Issue 26 item 3: a vocabulary sentencepiece trained (every piece its own score) gives the
    same ids in transformers' fast tokenizer as in training, and decodes back to the text."""
    from tokenizers import Tokenizer as Fast
    from transformers import AutoTokenizer

    from tokenizer import write_hf_tokenizer_files

    tok = Tokenizer(tokenizer_file)
    how = write_hf_tokenizer_files(tok, tmp_path, {"max_position_embeddings": 512})
    assert how.startswith("tokenizer.json gives sentencepiece's ids (no two pieces share a score)")
    fast, hf = Fast.from_file(str(tmp_path / "tokenizer.json")), AutoTokenizer.from_pretrained(tmp_path)
    texts = medical_texts()
    assert len(texts) > 500
    for text in texts:
        assert fast.encode(text, add_special_tokens=False).ids == tok.encode(text), text
        assert hf(text)["input_ids"] == tok.encode(text, bos=True), text
        assert hf.decode(tok.encode(text), skip_special_tokens=True) == tok.decode(tok.encode(text)), text


def merged_vocabulary(tmp_path: Path) -> Path:
    """A faithful stand-in for Ziya's tokenizer: Chinese-LLaMA-Alpaca's merge recipe
    (scripts/merge_tokenizer/merge_tokenizers.py at 090475f) — the pieces of a second model not in
    the first appended with score 0 — applied to two models trained on this project's texts.
    有效 and 效果 (score 0, 效果 the lower id) make sure two tied pieces overlap."""
    from sentencepiece import sentencepiece_model_pb2 as pb

    texts = medical_texts()
    train_tokenizer(
        texts[::2] + ["hello world, the patient has a fever."] * 20, tmp_path / "base.model", vocab_size=1600
    )
    train_tokenizer(texts[1::2], tmp_path / "zh.model", vocab_size=3000)
    base, zh = pb.ModelProto(), pb.ModelProto()
    base.ParseFromString((tmp_path / "base.model").read_bytes())
    zh.ParseFromString((tmp_path / "zh.model").read_bytes())
    have = {p.piece for p in base.pieces}
    for piece in ["效果", "有效"] + [p.piece for p in zh.pieces if p.type == pb.ModelProto.SentencePiece.NORMAL]:
        if piece not in have:
            base.pieces.append(pb.ModelProto.SentencePiece(piece=piece, score=0.0))
            have.add(piece)
    (tmp_path / "merged.model").write_bytes(base.SerializeToString())
    return tmp_path / "merged.model"


def test_tokenizer_json_on_a_merged_vocabulary_differs_from_sentencepiece_only_in_breaking_ties(tmp_path):
    """Where pieces share a score sentencepiece joins the leftmost pair, which no merge list can
    say. Shown: that rule on a hand-worked case; transformers' own conversion of tokenizer.model
    missing it; and the exported tokenizer.json equal, on every text, to sentencepiece itself with
    the ties broken in the export's order — so the tie rule is the one difference."""
    import json

    from sentencepiece import sentencepiece_model_pb2 as pb
    from tokenizers import Tokenizer as Fast
    from transformers import AutoTokenizer

    from tokenizer import write_hf_tokenizer_files

    tok = Tokenizer(merged_vocabulary(tmp_path))
    texts = medical_texts() + ["有效果吗", "关于减肥代餐粉有效果吗？"]
    assert [tok.sp.id_to_piece(i) for i in tok.encode("有效果")] == ["▁", "有效", "果"]  # the leftmost of two ties

    (tmp_path / "theirs").mkdir()  # transformers converting tokenizer.model itself, as before this export
    write_hf_tokenizer_files(tok, tmp_path / "theirs", {})
    (tmp_path / "theirs" / "tokenizer.json").unlink()
    theirs = AutoTokenizer.from_pretrained(tmp_path / "theirs")
    theirs_agree = sum(theirs(t)["input_ids"] == tok.encode(t, bos=True) for t in texts)
    assert theirs_agree < len(texts)  # the stand-in has ties that matter, as a merged vocabulary does

    how = write_hf_tokenizer_files(tok, tmp_path, {})
    assert "except where pieces of equal score overlap" in how
    ours = AutoTokenizer.from_pretrained(tmp_path)
    assert ours("有效果")["input_ids"] == tok.encode("有效果", bos=True)

    # sentencepiece with each piece's score replaced by its place in the exported merge list
    fast = json.loads((tmp_path / "tokenizer.json").read_text(encoding="utf-8"))
    rank: dict[str, int] = {}
    for left, right in fast["model"]["merges"]:
        rank.setdefault(left + right, len(rank))
    proto = pb.ModelProto()
    proto.ParseFromString(tok.path.read_bytes())
    for p in proto.pieces:
        if p.piece in rank:
            p.score = -float(rank[p.piece])
    (tmp_path / "untied.model").write_bytes(proto.SerializeToString())
    untied = Tokenizer(tmp_path / "untied.model")
    reader = Fast.from_file(str(tmp_path / "tokenizer.json"))
    same = 0
    for text in texts:
        assert ours(text)["input_ids"] == untied.encode(text, bos=True), text
        assert reader.encode(text, add_special_tokens=False).ids == untied.encode(text), text
        same += untied.encode(text) == tok.encode(text)
    assert same >= theirs_agree  # the export's order of ties is at least as near sentencepiece's rule


def official_demo_prompt(query: str, history: list[tuple[str, str]], eos: str) -> str:
    """generate_prompt of the official demo (FreedomIntelligence/HuatuoGPT at 1412a5d,
    huatuo_cli_demo_stream.py), transcribed: the system text, then per earlier round
    "<病人>：{q} <HuatuoGPT>：{r}" + eos, then "<病人>：{query} <HuatuoGPT>："."""
    system = (
        "一位用户和智能医疗大模型HuatuoGPT之间的对话。对于用户的医疗问诊，HuatuoGPT给出准确的、详细的、温暖的指导建议。"
        "对于用户的指令问题，HuatuoGPT给出有益的、详细的、有礼貌的回答。"
    )
    return (
        system + "".join(f"<病人>：{q} <HuatuoGPT>：{r}" + eos for q, r in history) + f"<病人>：{query} <HuatuoGPT>："
    )


def test_a_saved_checkpoint_carries_the_demos_chat_template_and_chat_py_s_sampling(tmp_path, tokenizer_file):
    """Issue 26 item 2: vLLM, TGI and apply_chat_template need chat_template in
    tokenizer_config.json, and the sampling settings lived only in code."""
    from transformers import AutoTokenizer, GenerationConfig

    from data.template import CHAT_SAMPLING
    from model import ModelConfig, Transformer

    cfg = ModelConfig(
        vocab_size=400,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=64,
    )
    save_model(Transformer(cfg), tmp_path / "m", tokenizer=tokenizer_file)
    hf = AutoTokenizer.from_pretrained(tmp_path / "m")
    history = [("头痛三天了", "多休息，注意饮水。"), ("还有发烧", "量一下体温。")]
    for rounds in range(len(history) + 1):
        messages = [
            {"role": role, "content": text}
            for q, r in history[:rounds]
            for role, text in (("user", q), ("assistant", r))
        ] + [{"role": "user", "content": "需要吃药吗？"}]
        demo = official_demo_prompt("需要吃药吗？", history[:rounds], "</s>")
        # the demo's string, and the <s> that its tokenizer(prompt) puts before it (add_bos_token)
        assert hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=False) == "<s>" + demo
        ids = hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)
        assert ids["input_ids"] == hf(demo)["input_ids"]
    with pytest.raises(Exception, match="no system role"):
        hf.apply_chat_template([{"role": "system", "content": "x"}], tokenize=False)
    generation = GenerationConfig.from_pretrained(tmp_path / "m")
    assert {k: getattr(generation, k) for k in CHAT_SAMPLING} == CHAT_SAMPLING
    assert (generation.bos_token_id, generation.eos_token_id, generation.pad_token_id) == (1, 2, 0)
