"""The tokenizer against real vocabularies: LLaMA's SentencePiece model, SmolLM2's GGUF, and the
tokenizer.json and GGUF-"llama" paths checked for identical ids against those two."""

import json
from pathlib import Path

import gguf
import pytest
import sentencepiece
from tokenizers import pre_tokenizers

from llama_adapter.tokenizer import HFTokenizer, TokenizerError, load_tokenizer

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "In 2024, the company reported revenue of $3.5 billion (up 12% year-over-year).",
    "Line one.\nLine two, with a tab:\there.\n\nA new paragraph!",
    "What's the capital of France? It's Paris; it has ~2.1 million people.",
    "  Leading spaces, and    several   inner ones.",
    'She said: "Don\'t worry -- it\'ll be fine," and left at 9:45 p.m.',
]


@pytest.fixture(scope="module")
def llama_sp(llama_sp_model):
    return load_tokenizer(llama_sp_model)


@pytest.fixture(scope="module")
def smollm2(smollm2_gguf):
    return load_tokenizer(smollm2_gguf)


def test_llama_sentencepiece(llama_sp):
    assert llama_sp.encode("Hello world") == [15043, 3186]
    assert llama_sp.encode("Hello world", bos=True, eos=True) == [1, 15043, 3186, 2]
    assert (llama_sp.bos_id, llama_sp.eos_id, llama_sp.vocab_size) == (1, 2, 32000)
    assert llama_sp.pad_id == llama_sp.eos_id  # the model declares no pad piece
    for text in SENTENCES:
        assert llama_sp.decode(llama_sp.encode(text, bos=True, eos=True)) == text


def test_directory_with_tokenizer_model(llama_sp_model, tmp_path):
    (tmp_path / "tokenizer.model").write_bytes(llama_sp_model.read_bytes())
    assert load_tokenizer(tmp_path).encode("Hello world") == [15043, 3186]


def test_smollm2_gguf(smollm2):
    assert (smollm2.bos_id, smollm2.eos_id, smollm2.pad_id, smollm2.vocab_size) == (1, 2, 2, 49152)
    for text in SENTENCES:
        ids = smollm2.encode(text, bos=True, eos=True)
        assert ids[0] == 1 and ids[-1] == 2 and 1 not in ids[1:-1]
        assert smollm2.decode(ids) == text  # BOS/EOS dropped
    chat = smollm2.encode("<|im_start|>user\nHi<|im_end|>")
    assert chat[0] == 1 and chat[-1] == 2 and len(chat) == 5
    assert smollm2.decode(chat) == "user\nHi"
    year = smollm2.encode("2024")
    assert len(year) == 4 and smollm2.decode(year) == "2024"


def test_hf_tokenizer_json_matches_gguf(smollm2, tmp_path):
    assert isinstance(smollm2, HFTokenizer)
    smollm2.backend.save(str(tmp_path / "tokenizer.json"))
    # Both spellings a tokenizer_config.json uses: a bare string and an AddedToken dict.
    config = {"bos_token": "<|im_start|>", "eos_token": {"content": "<|im_end|>"},
              "pad_token": "<|endoftext|>"}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    hf = load_tokenizer(tmp_path)
    assert (hf.bos_id, hf.eos_id, hf.pad_id, hf.vocab_size) == (1, 2, 0, 49152)
    for text in SENTENCES + ["<|im_start|>assistant\nSure.<|im_end|>"]:
        assert hf.encode(text, bos=True, eos=True) == smollm2.encode(text, bos=True, eos=True)
        assert hf.decode(hf.encode(text)) == smollm2.decode(smollm2.encode(text))


def test_hf_tokenizer_json_without_usable_config(smollm2, tmp_path):
    smollm2.backend.save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(TokenizerError, match="cannot determine BOS/EOS"):
        load_tokenizer(tmp_path / "tokenizer.json")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))
    with pytest.raises(TokenizerError, match="not in the vocabulary"):
        load_tokenizer(tmp_path)


def _write_llama_gguf(model: Path, path: Path) -> Path:
    """A metadata-only GGUF carrying the LLaMA SentencePiece vocabulary, as llama.cpp's converter
    writes it."""
    sp = sentencepiece.SentencePieceProcessor(model_file=str(model))
    ids = range(sp.get_piece_size())
    types = [gguf.TokenType.UNKNOWN if sp.is_unknown(i) else gguf.TokenType.CONTROL if sp.is_control(i)
             else gguf.TokenType.BYTE if sp.is_byte(i) else gguf.TokenType.NORMAL for i in ids]
    writer = gguf.GGUFWriter(path, arch="llama")
    writer.add_tokenizer_model("llama")
    writer.add_token_list([sp.id_to_piece(i) for i in ids])
    writer.add_token_scores([sp.get_score(i) for i in ids])
    writer.add_token_types(types)
    writer.add_bos_token_id(sp.bos_id())
    writer.add_eos_token_id(sp.eos_id())
    writer.add_add_space_prefix(True)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_gguf_llama_vocabulary_matches_sentencepiece(llama_sp, llama_sp_model, shared_data, tmp_path):
    rebuilt = load_tokenizer(_write_llama_gguf(llama_sp_model, tmp_path / "llama.gguf"))
    records = json.loads((shared_data / "alpaca" / "alpaca_sample_5000.json").read_text())[:31]
    texts = SENTENCES + [r["instruction"] + "\n" + r["input"] + "\n" + r["output"] for r in records] + [
        "", " ", "   ", "Grüße aus Köln, ça va?", "日本語のテキストと中文。", "Emoji: 😀🚀👍🏽", "x\u200by",
        "Привет, мир!", "\tTabbed\r\nCRLF", "<s> literal </s>", "a  b   c    d", "١٢٣ ۴۵۶", "ℕ ⊆ ℝ ∀ε>0",
    ]
    assert len(texts) >= 50
    assert (rebuilt.bos_id, rebuilt.eos_id, rebuilt.pad_id, rebuilt.vocab_size) == (1, 2, 2, 32000)
    for text in texts:
        assert rebuilt.encode(text, bos=True, eos=True) == llama_sp.encode(text, bos=True, eos=True), text
        assert rebuilt.decode(rebuilt.encode(text)) == llama_sp.decode(llama_sp.encode(text))


def _write_bpe_gguf(path: Path, pre: str) -> Path:
    """A byte-level vocabulary with one merge ("Ġ t") and two control tokens."""
    tokens = sorted(pre_tokenizers.ByteLevel.alphabet()) + ["<|bos|>", "<|eos|>", "Ġt"]
    writer = gguf.GGUFWriter(path, arch="llama")
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    normal, control = gguf.TokenType.NORMAL, gguf.TokenType.CONTROL
    writer.add_token_types([normal] * 256 + [control] * 2 + [normal])
    writer.add_token_merges(["Ġ t"])
    writer.add_bos_token_id(256)
    writer.add_eos_token_id(257)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.mark.parametrize("pre", ["llama-bpe", "gpt2", "default", "smollm"])
def test_gguf_bpe_pre_tokenizers_round_trip(pre, tmp_path):
    tok = load_tokenizer(_write_bpe_gguf(tmp_path / "bpe.gguf", pre))
    for text in SENTENCES + ["Grüße 😀 12345"]:
        ids = tok.encode(text, bos=True, eos=True)
        assert ids[0] == 256 and ids[-1] == 257
        assert tok.decode(ids) == text
    assert tok.encode(" to") == [258, tok.encode("o")[0]]


def test_unknown_gguf_pre_tokenizer(tmp_path):
    path = _write_bpe_gguf(tmp_path / "bpe.gguf", "made-up")
    with pytest.raises(TokenizerError, match="'made-up'.*llama-bpe") as e:
        load_tokenizer(path)
    assert str(path) in str(e.value)


def test_truncated_gguf(llama_sp_model, tmp_path):
    path = _write_llama_gguf(llama_sp_model, tmp_path / "llama.gguf")
    data = path.read_bytes()
    for cut in (10, len(data) // 2):
        path.write_bytes(data[:cut])
        with pytest.raises(TokenizerError, match="not a readable GGUF") as e:
            load_tokenizer(path)
        assert str(path) in str(e.value)


def test_gguf_without_vocabulary(tmp_path):
    path = tmp_path / "empty.gguf"
    writer = gguf.GGUFWriter(path, arch="llama")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(TokenizerError, match="no tokenizer.ggml.model"):
        load_tokenizer(path)


@pytest.mark.parametrize("name, content, message", [
    ("random.model", bytes(range(256)) * 4, "not a readable SentencePiece model"),
    ("tokenizer.json", b"{not json", "not a readable tokenizer.json"),
    ("vocab.txt", b"hello", "expected a SentencePiece .model"),
])
def test_bad_files(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(TokenizerError, match=message) as e:
        load_tokenizer(path)
    assert str(path) in str(e.value)


@pytest.mark.parametrize("name", ["missing.model", "missing.gguf", "missing_dir"])
def test_missing_paths(tmp_path, name):
    with pytest.raises(TokenizerError) as e:
        load_tokenizer(tmp_path / name)
    assert str(tmp_path / name) in str(e.value)


@pytest.mark.parametrize("content", ["{broken", "[1, 2]"])
def test_a_damaged_tokenizer_config_is_named(tmp_path, content):
    """A damaged tokenizer_config.json beside a good tokenizer.json was reported as the tokenizer.json."""
    from tokenizers import Tokenizer, models

    vocabulary = models.WordLevel({"<s>": 0, "</s>": 1, "[UNK]": 2}, unk_token="[UNK]")
    Tokenizer(vocabulary).save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(content)
    with pytest.raises(TokenizerError, match=r"tokenizer_config.json: (not valid JSON|holds a JSON list)"):
        load_tokenizer(tmp_path)


# ---------------------------------------------------------------- the vocabulary's identity


def test_the_vocabulary_digest_is_the_vocabularys_not_the_files(llama_sp, llama_sp_model, tmp_path):
    """One vocabulary has one digest in every format that carries it (a SentencePiece .model and a GGUF; a GGUF and
    a tokenizer.json), whatever the file's bytes; another vocabulary, or other special ids, another digest. Each
    tokenizer knows the file it was read from."""
    digest = llama_sp.vocabulary_digest()
    assert len(digest) == 64 and int(digest, 16) >= 0
    gguf_path = _write_llama_gguf(llama_sp_model, tmp_path / "llama.gguf")
    assert load_tokenizer(gguf_path).vocabulary_digest() == digest
    assert load_tokenizer(llama_sp_model).vocabulary_digest() == digest  # the same file read twice
    assert (llama_sp.source, load_tokenizer(gguf_path).source) == (str(llama_sp_model), str(gguf_path))

    bpe = load_tokenizer(_write_bpe_gguf(tmp_path / "bpe.gguf", "gpt2"))
    assert bpe.vocabulary_digest() != digest
    (tmp_path / "hf").mkdir()
    bpe.backend.save(str(tmp_path / "hf" / "tokenizer.json"))
    (tmp_path / "hf" / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<|bos|>", "eos_token": "<|eos|>"}))
    hf = load_tokenizer(tmp_path / "hf")
    assert hf.source == str(tmp_path / "hf" / "tokenizer.json")
    assert hf.vocabulary_digest() == bpe.vocabulary_digest()

    # The same pieces with another EOS: the ids that end a sample mean another token.
    swapped = json.dumps({"bos_token": "<|eos|>", "eos_token": "<|bos|>"})
    (tmp_path / "hf" / "tokenizer_config.json").write_text(swapped)
    assert load_tokenizer(tmp_path / "hf").vocabulary_digest() != bpe.vocabulary_digest()
    # A pad id of its own is no part of it: tokenize writes none (padding is masked out wherever it is used).
    (tmp_path / "hf" / "tokenizer_config.json").write_text(
        json.dumps({"bos_token": "<|bos|>", "eos_token": "<|eos|>", "pad_token": "Ġt"}))
    assert load_tokenizer(tmp_path / "hf").vocabulary_digest() == bpe.vocabulary_digest()
