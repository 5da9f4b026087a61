"""Checkpoint formats: Meta shards, HF safetensors (sharded), GGUF, adapters; and the errors on bad files."""

import dataclasses
import json
import math
import re
import shutil

import pytest
import torch

from llama_adapter.adapter import AdaptedTransformer
from llama_adapter.checkpoint import (
    CheckpointError,
    apply_adapter,
    base_layers,
    checkpoint_format,
    load_base,
    load_model,
    read_adapter,
    save_adapter,
    save_full,
    save_meta_checkpoint,
    to_foreign_name,
)
from llama_adapter.config import AdapterArgs, ModelArgs
from llama_adapter.generate import generate
from llama_adapter.model import Transformer


def random_model(preset: str | ModelArgs = "tiny-gqa", adapter=None, seed=0) -> Transformer:
    torch.manual_seed(seed)
    args = preset if isinstance(preset, ModelArgs) else ModelArgs.from_name(preset)
    m = AdaptedTransformer(args, adapter).eval()
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
            if name == "adapter_gate":
                p.normal_()
    return m


def tokens(m, B=2, T=9):
    return torch.randint(0, m.args.vocab_size, (B, T), generator=torch.Generator().manual_seed(3))


def assert_same_logits(a, b, atol=0.0):
    x = tokens(a)
    with torch.no_grad():
        diff = (a(x) - b(x)).abs().max().item()
    assert diff <= atol, diff


# ---------------------------------------------------------------- Meta


@pytest.mark.parametrize("n_shards", [1, 2])
@pytest.mark.parametrize("preset", ["tiny", "tiny-gqa"])
def test_meta_round_trip(tmp_path, preset, n_shards):
    m = random_model(preset)
    save_meta_checkpoint(m, tmp_path, n_shards=n_shards)
    shards = sorted(p.name for p in tmp_path.glob("consolidated.*.pth"))
    assert shards == [f"consolidated.{r:02d}.pth" for r in range(n_shards)]
    if n_shards == 2:  # really split, as Meta's ranks: wq by rows, wo by columns, embeddings by columns
        shard = torch.load(tmp_path / "consolidated.00.pth", weights_only=True)
        assert shard["layers.0.attention.wq.weight"].shape == (m.args.dim // 2, m.args.dim)
        assert shard["layers.0.attention.wo.weight"].shape == (m.args.dim, m.args.dim // 2)
        assert shard["tok_embeddings.weight"].shape == (m.args.vocab_size, m.args.dim // 2)
    loaded = load_base(tmp_path)
    for k, v in m.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k]), k
    assert_same_logits(m, loaded)


def test_meta_save_over_more_shards_leaves_only_its_own(tmp_path):
    """A reader takes every consolidated.NN.pth in the folder: saving 1 shard where 2 were leaves no stale rank."""
    save_meta_checkpoint(random_model("tiny", seed=1), tmp_path, n_shards=2)
    m = random_model("tiny")
    save_meta_checkpoint(m, tmp_path, n_shards=1)
    assert sorted(p.name for p in tmp_path.glob("consolidated.*.pth")) == ["consolidated.00.pth"]
    assert_same_logits(m, load_base(tmp_path))


def test_meta_files_not_named_as_a_shard_are_no_shards(tmp_path):
    """A glob on consolidated.*.pth took a backup (consolidated.01.pth.bak.pth) or consolidated.final.pth for a
    model-parallel rank: the load merged it as one, and a save deleted it as a stale rank. Only
    consolidated.<two or more digits>.pth is a shard; other files are left alone."""
    m = random_model("tiny")
    save_meta_checkpoint(m, tmp_path, n_shards=2)
    strays = ["consolidated.01.pth.bak.pth", "consolidated.final.pth", "consolidated.1.pth"]
    for name in strays:
        (tmp_path / name).write_bytes((tmp_path / "consolidated.01.pth").read_bytes())
    assert_same_logits(m, load_base(tmp_path))
    save_meta_checkpoint(m, tmp_path, n_shards=1)
    assert all((tmp_path / name).exists() for name in strays)
    assert_same_logits(m, load_base(tmp_path))


def test_meta_shards_of_other_tensor_names_are_counted_and_listed(tmp_path):
    """A shard holding other tensors than the first named ten of them, with no count nor sign that more were left
    out: now their count and the first ones, ' ...' after them."""
    save_meta_checkpoint(random_model("tiny"), tmp_path, n_shards=2)
    shard = tmp_path / "consolidated.01.pth"
    state = torch.load(shard, weights_only=True)
    torch.save({**state, **{f"extra.{i:02d}": torch.zeros(1) for i in range(25)}}, shard)
    with pytest.raises(CheckpointError, match=r"consolidated.01.pth: holds other tensor names than consolidated.00.pth "
                                              r"\(25\): extra.00, extra.01, .*extra.19 \.\.\.$"):
        load_base(tmp_path)


def test_meta_shards_with_a_rank_missing_or_doubled_are_named(tmp_path):
    """Ranks 00 and 05 (01 to 04 lost) were merged as a checkpoint of two ranks: loaded where their shapes fit, else
    refused on the tensors' shapes with no word of the lost files. The folder and the missing ranks are named
    instead, as is a rank in two files."""
    save_meta_checkpoint(random_model("tiny"), tmp_path, n_shards=2)
    (tmp_path / "consolidated.01.pth").rename(tmp_path / "consolidated.05.pth")
    expected = f"{tmp_path}: expected one consolidated.NN.pth for each model-parallel rank 00 to "
    with pytest.raises(CheckpointError, match=re.escape(expected + "05: missing ranks (4): 01, 02, 03, 04")):
        load_base(tmp_path)
    (tmp_path / "consolidated.05.pth").rename(tmp_path / "consolidated.01.pth")
    (tmp_path / "consolidated.001.pth").write_bytes((tmp_path / "consolidated.01.pth").read_bytes())
    with pytest.raises(CheckpointError, match=re.escape(expected + "01: ranks in more than one file (1): 01")):
        load_base(tmp_path)


def test_a_stray_shard_of_a_far_rank_is_named_without_listing_every_missing_rank(tmp_path):
    """A backup named by its date (consolidated.20240101.pth) beside consolidated.00.pth reads as rank 20240101:
    the error built one string for each of the 20 million missing ranks (1.4 GB, 6 s) to show 20 of them. Only
    those shown are made, and the count is given."""
    import tracemalloc

    save_meta_checkpoint(random_model("tiny"), tmp_path)
    (tmp_path / "consolidated.2000000.pth").write_bytes(b"")
    tracemalloc.start()
    try:
        with pytest.raises(CheckpointError,
                           match=r"rank 00 to 2000000: missing ranks \(1999999\): 01, 02, .*, 20 \.\.\.$"):
            load_base(tmp_path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 10_000_000, peak


def test_a_hf_folder_with_a_stray_consolidated_file_is_hf(tmp_path):
    """params.json beside config.json is Meta's layout only where a shard lies beside it: a stray
    consolidated.final.pth made the folder Meta's, read for shards it does not have."""
    for name in ("config.json", "params.json", "consolidated.final.pth"):
        (tmp_path / name).write_text("{}")
    assert checkpoint_format(tmp_path) == "hf"
    (tmp_path / "consolidated.00.pth").write_text("{}")
    assert checkpoint_format(tmp_path) == "meta"


def test_shards_that_disagree_name_their_folder(tmp_path):
    save_meta_checkpoint(random_model("tiny"), tmp_path, n_shards=2)
    shard = torch.load(tmp_path / "consolidated.01.pth", weights_only=True)
    shard["norm.weight"] += 1  # replicated on every rank: must be equal
    torch.save(shard, tmp_path / "consolidated.01.pth")
    with pytest.raises(CheckpointError, match=f"{tmp_path}, 2 model-parallel shards.*norm.weight: replicated"):
        load_base(tmp_path)


def test_meta_llama1_params_and_rope_freqs(tmp_path):
    """LLaMA-1's params.json says vocab_size -1 and its checkpoints carry a `rope.freqs` buffer."""
    m = random_model("tiny")
    save_meta_checkpoint(m, tmp_path, n_shards=2)
    params = {"dim": 64, "multiple_of": 16, "n_heads": 4, "n_layers": 4, "norm_eps": 1e-6, "vocab_size": -1}
    (tmp_path / "params.json").write_text(json.dumps(params))
    for p in tmp_path.glob("consolidated.*.pth"):
        shard = torch.load(p, weights_only=True)
        shard["rope.freqs"] = torch.zeros(8)
        torch.save(shard, p)
    loaded = load_base(tmp_path)
    assert loaded.args.vocab_size == 256
    assert_same_logits(m, loaded)


def test_mismatched_checkpoint_lists_every_problem(tmp_path):
    m = random_model("tiny")
    save_meta_checkpoint(m, tmp_path)
    state = torch.load(tmp_path / "consolidated.00.pth", weights_only=True)
    del state["layers.1.attention.wq.weight"]
    state["layers.0.feed_forward.w2.weight"] = torch.zeros(3, 3)
    state["extra.weight"] = torch.zeros(1)
    torch.save(state, tmp_path / "consolidated.00.pth")
    with pytest.raises(CheckpointError) as e:
        load_base(tmp_path)
    msg = str(e.value)
    assert "missing (1): layers.1.attention.wq.weight" in msg
    assert "unexpected (1): extra.weight" in msg
    assert "layers.0.feed_forward.w2.weight: (3, 3) (expected (64, 176))" in msg


def test_truncated_pth_is_a_clear_error(tmp_path):
    save_meta_checkpoint(random_model("tiny"), tmp_path)
    f = tmp_path / "consolidated.00.pth"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="consolidated.00.pth: cannot read as a PyTorch checkpoint.*truncated"):
        load_base(tmp_path)


def test_unknown_checkpoint_layout(tmp_path):
    with pytest.raises(CheckpointError, match="not a recognised checkpoint"):
        load_base(tmp_path)


# ---------------------------------------------------------------- Hugging Face


def test_hf_sharded_safetensors_with_index(tmp_path):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2)
    hf = transformers.LlamaForCausalLM(cfg).eval()
    hf.save_pretrained(tmp_path, max_shard_size="50KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 1
    ours = load_base(tmp_path)
    x = torch.randint(0, 256, (2, 7))
    with torch.no_grad():
        assert (ours(x) - hf(x).logits).abs().max() < 1e-4


def test_truncated_safetensors_is_a_clear_error(tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                   num_attention_heads=2)
    transformers.LlamaForCausalLM(cfg).save_pretrained(tmp_path)
    f = tmp_path / "model.safetensors"
    f.write_bytes(f.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="model.safetensors: cannot read as safetensors"):
        load_base(tmp_path)


def test_hf_rope_scaling_is_refused(tmp_path):
    config = {"model_type": "llama", "hidden_size": 64, "num_hidden_layers": 1, "num_attention_heads": 4,
              "vocab_size": 10, "intermediate_size": 8, "rope_scaling": {"rope_type": "llama3", "factor": 8.0}}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="RoPE type 'llama3'"):
        load_base(tmp_path)


# ---------------------------------------------------------------- GGUF


def write_gguf(path, m: Transformer, qtype=None):
    """A GGUF as llama.cpp's converter writes a LLaMA: q/k rows in the interleaved layout (same as Meta's),
    ggml dimension order; with `qtype`, the 2-D weights quantized."""
    gguf = pytest.importorskip("gguf")
    w = gguf.GGUFWriter(path, "llama")
    a = m.args
    w.add_block_count(a.n_layers)
    w.add_context_length(a.max_seq_len)
    w.add_embedding_length(a.dim)
    w.add_feed_forward_length(a.hidden_dim)
    w.add_head_count(a.n_heads)
    w.add_head_count_kv(a.n_kv_heads)
    w.add_rope_freq_base(a.rope_theta)
    w.add_layer_norm_rms_eps(a.norm_eps)
    names = {"tok_embeddings": "token_embd", "norm": "output_norm", "output": "output", "wq": "attn_q",
             "wk": "attn_k", "wv": "attn_v", "wo": "attn_output", "w1": "ffn_gate", "w2": "ffn_down",
             "w3": "ffn_up", "attention_norm": "attn_norm", "ffn_norm": "ffn_norm"}
    for k, v in m.state_dict().items():
        parts = k.split(".")
        name = f"blk.{parts[1]}.{names[parts[-2]]}.weight" if parts[0] == "layers" else f"{names[parts[0]]}.weight"
        data = v.numpy()
        if qtype is not None and data.ndim == 2:
            w.add_tensor(name, gguf.quants.quantize(data, qtype), raw_dtype=qtype)
        else:
            w.add_tensor(name, data)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_gguf_f32_round_trip(tmp_path):
    m = random_model("tiny-gqa")
    write_gguf(tmp_path / "m.gguf", m)
    loaded = load_base(tmp_path / "m.gguf")
    assert loaded.args.n_kv_heads == 2 and not loaded.args.tie_embeddings
    assert_same_logits(m, loaded)


def test_gguf_quantized_q8_0(tmp_path):
    gguf = pytest.importorskip("gguf")
    m = random_model(ModelArgs(dim=64, n_layers=2, n_heads=4, vocab_size=256, hidden_dim=128))  # Q8_0 blocks of 32
    write_gguf(tmp_path / "m.gguf", m, qtype=gguf.GGMLQuantizationType.Q8_0)
    loaded = load_base(tmp_path / "m.gguf")
    w, q = m.layers[0].attention.wq.weight, loaded.layers[0].attention.wq.weight
    assert not torch.equal(w, q) and (w - q).abs().max() < w.abs().max() / 100  # dequantized, 8-bit close


def test_base_layers_are_read_from_each_formats_settings_alone(tmp_path):
    """What a plan checks an adapter's layers against, for every base format, without the weights: params.json,
    config.json and the GGUF header each give the block count (a folder with only its settings reads the same)."""
    m = random_model(ModelArgs(dim=64, n_layers=5, n_heads=4, vocab_size=256, hidden_dim=128))
    save_meta_checkpoint(m, tmp_path / "meta")
    save_full(m, tmp_path / "hf", "elsewhere")
    write_gguf(tmp_path / "m.gguf", m)
    (tmp_path / "settings").mkdir()
    shutil.copy(tmp_path / "hf" / "config.json", tmp_path / "settings")
    for base in ("meta", "hf", "m.gguf", "settings"):
        assert base_layers(tmp_path / base) == 5, base
    (tmp_path / "settings" / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(CheckpointError, match=r"settings/config.json: model_type 'gpt2' is not a LLaMA"):
        base_layers(tmp_path / "settings")
    (tmp_path / "m.gguf").write_bytes((tmp_path / "m.gguf").read_bytes()[:40])
    with pytest.raises(CheckpointError, match="m.gguf"):
        base_layers(tmp_path / "m.gguf")


def test_a_mis_shaped_gguf_tensor_is_named_by_its_file_and_its_own_name(tmp_path):
    """As for Hugging Face's layout: the error names the tensor as the GGUF file does, not only by Meta's name."""
    m = random_model("tiny")
    m.layers[0].attention.wq.weight = torch.nn.Parameter(torch.zeros(3, 3))
    write_gguf(tmp_path / "m.gguf", m)
    with pytest.raises(CheckpointError, match=r"mis-shaped \(1\): layers.0.attention.wq.weight: \(3, 3\) "
                                              r"\(expected .*\) \(m.gguf: blk.0.attn_q.weight\)"):
        load_base(tmp_path / "m.gguf")


def test_truncated_gguf_is_a_clear_error(tmp_path):
    write_gguf(tmp_path / "m.gguf", random_model("tiny"))
    f = tmp_path / "m.gguf"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 3])
    with pytest.raises(CheckpointError, match=r"m.gguf: cannot read as GGUF"):
        load_base(f)


# ---------------------------------------------------------------- adapters


def test_adapter_save_load_round_trip(tmp_path):
    adapter = AdapterArgs(adapter_len=3, adapter_layers=2, gate_init="zero")
    m = random_model("tiny", adapter)
    save_meta_checkpoint(m, tmp_path / "base")
    save_adapter(m, tmp_path / "a.safetensors", base_model="tiny-test")
    args, header, tensors = read_adapter(tmp_path / "a.safetensors")
    assert args == adapter and header["base_model"] == "tiny-test"
    assert set(tensors) == {"adapter_query", "adapter_gate"}
    assert all(t.dtype == torch.float32 for t in tensors.values())
    loaded = load_model(tmp_path / "base", tmp_path / "a.safetensors")
    assert_same_logits(m, loaded)


def test_adapter_refuses_another_base(tmp_path):
    m = random_model("tiny", AdapterArgs(adapter_len=3, adapter_layers=2))
    save_adapter(m, tmp_path / "a.safetensors", base_model="tiny")
    save_meta_checkpoint(random_model("tiny-gqa"), tmp_path / "other")
    with pytest.raises(CheckpointError, match=r"trained on base 'tiny'.*n_kv_heads': \(4, 2\)"):
        load_model(tmp_path / "other", tmp_path / "a.safetensors")


def test_original_release_adapter_pth(tmp_path):
    """The paper's released adapters: adapter_query.weight (layers*len, dim) and a (1, nh, 1, 1) gate in
    every layer, zero below the adapted ones."""
    adapter = AdapterArgs(adapter_len=3, adapter_layers=2)
    m = random_model("tiny", adapter)
    save_meta_checkpoint(m, tmp_path / "base")
    first = m.args.n_layers - adapter.adapter_layers
    release = {"adapter_query.weight": m.adapter_query.detach().reshape(-1, m.args.dim).half()}
    for i in range(m.args.n_layers):
        gate = m.adapter_gate[i - first] if i >= first else torch.zeros(m.args.n_heads)
        release[f"layers.{i}.attention.gate"] = gate.detach().reshape(1, -1, 1, 1).half()
    torch.save(release, tmp_path / "release.pth")
    loaded = load_model(tmp_path / "base", tmp_path / "release.pth", adapter=adapter)
    assert_same_logits(m, loaded, atol=0.05)  # the release is fp16
    with pytest.raises(CheckpointError, match="needs adapter_len/adapter_layers"):
        load_model(tmp_path / "base", tmp_path / "release.pth")


def test_an_adapter_shape_other_than_the_files_own_is_refused(tmp_path):
    """A .safetensors records its own shape: an `adapter` that differs from it is refused, naming the file and
    both shapes, rather than silently dropped; the file's own shape (gate_init aside) is no error."""
    adapter = AdapterArgs(adapter_len=3, adapter_layers=2, gate_init="random")
    m = random_model("tiny", adapter)
    save_meta_checkpoint(m, tmp_path / "base")
    save_adapter(m, tmp_path / "a.safetensors", base_model="tiny-test")
    with pytest.raises(CheckpointError) as e:
        load_model(tmp_path / "base", tmp_path / "a.safetensors", adapter=AdapterArgs(adapter_len=5, adapter_layers=2))
    assert str(e.value).startswith(f"{tmp_path / 'a.safetensors'}: adapter_len 5 given, but the file records its own "
                                   "shape, adapter_len 3;")
    assert_same_logits(m, load_model(tmp_path / "base", tmp_path / "a.safetensors",
                                     adapter=AdapterArgs(adapter_len=3, adapter_layers=2)))
    # visual_hidden is no part of a text-only adapter's shape (no image projection to be that wide)
    assert_same_logits(m, load_model(tmp_path / "base", tmp_path / "a.safetensors",
                                     adapter=AdapterArgs(adapter_len=3, adapter_layers=2, visual_hidden=256)))


def release_pth(m: AdaptedTransformer, path, n_layers: int | None = None) -> None:
    """`m`'s adapter as the paper's code released it, with a gate for each of `n_layers` layers (m's own)."""
    n_layers = n_layers or m.args.n_layers
    first = n_layers - m.adapter.adapter_layers
    release = {"adapter_query.weight": m.adapter_query.detach().reshape(-1, m.args.dim)}
    for i in range(n_layers):
        gate = m.adapter_gate[i - first] if i >= first else torch.zeros(m.args.n_heads)
        release[f"layers.{i}.attention.gate"] = gate.detach().reshape(1, -1, 1, 1)
    torch.save(release, path)


@pytest.mark.parametrize("depth", [-1, 1])
def test_original_release_of_another_depth_is_refused(tmp_path, depth):
    """The release's gates name every layer of the model it was trained on: one of another depth (whose prompts
    would land on shifted layers) is refused, naming the depths."""
    adapter = AdapterArgs(adapter_len=3, adapter_layers=2)
    m = random_model("tiny", adapter)
    release_pth(m, tmp_path / "release.pth", m.args.n_layers + depth)
    with pytest.raises(CheckpointError, match=f"release.pth: gates of layers 0..{m.args.n_layers + depth - 1}.*"
                                              f"each of the base's {m.args.n_layers} layers"):
        apply_adapter(random_model("tiny"), tmp_path / "release.pth", adapter)


def test_an_adapter_that_does_not_fit_leaves_the_model_as_it_was(tmp_path):
    """apply_adapter checks a file before it touches the model: one that does not fit raises, naming the file,
    and the adapter the model held still answers."""
    adapter = AdapterArgs(adapter_len=3, adapter_layers=2)
    narrow = random_model(ModelArgs(dim=32, n_layers=2, n_heads=2, vocab_size=256, multiple_of=16), adapter)
    release_pth(narrow, tmp_path / "narrow.pth", random_model("tiny").args.n_layers)
    m = random_model("tiny", AdapterArgs(adapter_len=4, adapter_layers=3, gate_init="random"))
    x = tokens(m)
    with torch.no_grad():
        before = m(x)
        with pytest.raises(CheckpointError, match="narrow.pth"):
            apply_adapter(m, tmp_path / "narrow.pth", adapter)
        assert torch.equal(m(x), before) and m.adapter.adapter_len == 4


def test_adapter_write_is_atomic(tmp_path, monkeypatch):
    import safetensors.torch

    m = random_model("tiny", AdapterArgs(adapter_len=3, adapter_layers=2))

    def broken(tensors, path, metadata=None):
        open(path, "wb").write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", broken)
    with pytest.raises(OSError):
        save_adapter(m, tmp_path / "a.safetensors", base_model="tiny")
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- from an audit of the loaders


def hf_folder(tmp_path, name="hf", shard_size=None):
    """A tiny random HF LLaMA (GQA) saved by transformers, sharded with an index if `shard_size` is given."""
    from hf_reference import random_hf_llama

    args = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=300, hidden_dim=96)
    hf = random_hf_llama(args)
    hf.save_pretrained(tmp_path / name, **({"max_shard_size": shard_size} if shard_size else {}))
    return tmp_path / name, hf, args


@pytest.mark.parametrize("form", ["../outside/{f}", "{outside}/{f}", "sub/../../outside/{f}"])
def test_hf_index_naming_a_file_outside_the_folder_is_refused(tmp_path, form):
    """model.safetensors.index.json is the checkpoint's word, like any file of it: a shard it names by a path
    leaving the folder (.., an absolute path) is refused before anything is read, as hub.py refuses it."""
    pytest.importorskip("transformers")
    folder, _, _ = hf_folder(tmp_path, shard_size="40KB")
    index_path = folder / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    first = sorted(set(index["weight_map"].values()))[0]
    (tmp_path / "outside").mkdir()
    (folder / first).rename(tmp_path / "outside" / first)
    escape = form.format(f=first, outside=tmp_path / "outside")
    index["weight_map"] = {k: escape if v == first else v for k, v in index["weight_map"].items()}
    index_path.write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=r"model.safetensors.index.json: weight_map names .*outside.*no files of"):
        load_base(folder)


def test_hf_index_with_a_non_string_file_is_a_checkpoint_error(tmp_path):
    pytest.importorskip("transformers")
    folder, _, _ = hf_folder(tmp_path)
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": ["model.safetensors"]}}))
    with pytest.raises(CheckpointError, match=r"index.json: weight_map names \[\['model.safetensors'\]\]"):
        load_base(folder)


def test_a_tensor_in_two_safetensors_files_is_refused(tmp_path):
    """Two files of one checkpoint holding the same tensor (a stale shard left beside a re-saved model) were
    merged silently, the file sorted last winning: refused, naming the tensor and both files."""
    pytest.importorskip("transformers")
    from safetensors.torch import load_file, save_file

    folder, _, _ = hf_folder(tmp_path)
    state = load_file(folder / "model.safetensors")
    (folder / "model.safetensors").rename(folder / "model-a.safetensors")
    save_file({"model.norm.weight": torch.zeros_like(state["model.norm.weight"])}, folder / "model-b.safetensors")
    with pytest.raises(CheckpointError, match=r"model-b.safetensors: holds model.norm.weight, which model-a.safetensors"
                                              r" holds too"):
        load_base(folder)


@pytest.mark.parametrize(("kind", "factor", "refused"), [("LINEAR", 4.0, True), ("YARN", 4.0, True),
                                                          ("NONE", 1.0, False)])
def test_gguf_rope_scaling_is_refused_not_ignored(tmp_path, monkeypatch, kind, factor, refused):
    """A GGUF's llama.rope.scaling.* (linear, YaRN: long-context models) was ignored, so positions were rotated as
    plain RoPE: refused by name, as a Hugging Face config's rope_scaling is."""
    gguf = pytest.importorskip("gguf")
    header = gguf.GGUFWriter.write_header_to_file

    def with_scaling(self, *a, **k):
        self.add_rope_scaling_type(getattr(gguf.RopeScalingType, kind))
        self.add_rope_scaling_factor(factor)
        return header(self, *a, **k)

    monkeypatch.setattr(gguf.GGUFWriter, "write_header_to_file", with_scaling)
    m = random_model("tiny-gqa")
    write_gguf(tmp_path / "m.gguf", m)
    if refused:
        with pytest.raises(CheckpointError, match=rf"m.gguf: RoPE scaling {kind.lower()!r} \(llama.rope.scaling"):
            load_base(tmp_path / "m.gguf")
    else:
        assert_same_logits(m, load_base(tmp_path / "m.gguf"))


@pytest.mark.parametrize("dtype", [torch.int64, torch.bool])
def test_a_weight_that_is_not_floating_point_is_refused(tmp_path, dtype):
    """Integer or boolean tensors where weights belong (a damaged or foreign file) were cast to float silently."""
    pytest.importorskip("transformers")
    from safetensors.torch import load_file, save_file

    folder, _, _ = hf_folder(tmp_path)
    state = load_file(folder / "model.safetensors")
    state["model.norm.weight"] = torch.ones(64, dtype=dtype)
    save_file(state, folder / "model.safetensors")
    with pytest.raises(CheckpointError, match=rf"not floating point \(1\): norm.weight: {dtype} "
                                              r"\(model.safetensors: model.norm.weight\)"):
        load_base(folder)


def test_an_adapter_tensor_that_is_not_floating_point_is_refused(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    m = random_model("tiny", AdapterArgs(adapter_len=3, adapter_layers=2))
    save_meta_checkpoint(m, tmp_path / "base")
    save_adapter(m, tmp_path / "a.safetensors", base_model="tiny")
    with safe_open(tmp_path / "a.safetensors", "pt") as f:
        header = f.metadata()
    tensors = load_file(tmp_path / "a.safetensors")
    tensors["adapter_gate"] = tensors["adapter_gate"].to(torch.int32)
    save_file(tensors, tmp_path / "a.safetensors", metadata=header)
    with pytest.raises(CheckpointError, match=r"a.safetensors does not match.*not floating point \(1\): adapter_gate"):
        load_model(tmp_path / "base", tmp_path / "a.safetensors")


@pytest.mark.parametrize(("change", "refused"), [({"norm_eps": 1e-5}, True), ({"rope_theta": 500000.0}, True),
                                                 ({"norm_eps": float(torch.tensor(1e-6, dtype=torch.float32))}, False),
                                                 ({"max_seq_len": 4096}, False)])
def test_an_adapter_onto_a_base_of_other_norm_eps_or_rope_theta_is_refused(tmp_path, change, refused):
    """LLaMA-1-7B and Llama-2-7B have the same shapes (dim, layers, heads, vocab, hidden) and differ in norm_eps:
    an adapter trained on one loaded onto the other silently. norm_eps and rope_theta are compared too (a GGUF's
    float32 copy of the same value is the same base); max_seq_len is not (Meta's params.json does not hold it)."""
    adapter = AdapterArgs(adapter_len=3, adapter_layers=2)
    m = random_model("tiny", adapter)
    save_adapter(m, tmp_path / "a.safetensors", base_model="tiny")
    other = random_model(ModelArgs(**{**m.args.to_dict(), **change}))
    save_meta_checkpoint(other, tmp_path / "other")
    if refused:
        [(key, value)] = change.items()
        with pytest.raises(CheckpointError, match=rf"a.safetensors: trained on base 'tiny'.*'{key}': \(.*, {value}\)"):
            load_model(tmp_path / "other", tmp_path / "a.safetensors")
    else:
        load_model(tmp_path / "other", tmp_path / "a.safetensors")


@pytest.mark.parametrize("value", ["abc", [10000.0], None, True, float("nan"), 10**400, "left out"],
                         ids=["string", "list", "null", "true", "nan", "10**400", "left-out"])
@pytest.mark.parametrize("key", ["rope_theta", "norm_eps"])
def test_an_adapter_header_base_args_number_that_is_no_number_is_refused(tmp_path, key, value):
    """base_args' norm_eps and rope_theta are compared only as numbers: "abc", a list, null or true was skipped and
    the adapter loaded onto any base (NaN was called another base, 10**400 an OverflowError). Each is refused as a
    damaged header naming the file and key; a header without the key is still compared on its shapes alone."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    m = random_model("tiny", AdapterArgs(adapter_len=3, adapter_layers=2))
    save_meta_checkpoint(m, tmp_path / "base")
    save_adapter(m, tmp_path / "a.safetensors", base_model="tiny")
    with safe_open(tmp_path / "a.safetensors", "pt") as f:
        header = f.metadata()
    base_args = json.loads(header["base_args"])
    if value == "left out":
        del base_args[key]
    else:
        base_args[key] = value
    save_file(load_file(tmp_path / "a.safetensors"), tmp_path / "a.safetensors",
              metadata={**header, "base_args": json.dumps(base_args)})
    if value == "left out":
        load_model(tmp_path / "base", tmp_path / "a.safetensors")
    else:
        with pytest.raises(CheckpointError, match=rf"a.safetensors: damaged adapter header: base_args {key} .*; "
                                                  "expected a positive finite number"):
            load_model(tmp_path / "base", tmp_path / "a.safetensors")


def test_a_pth_in_torch_legacy_format_loads(tmp_path):
    """torch.save's pre-1.6 (non-zip) format cannot be memory-mapped; such a file was called truncated or corrupted.
    It is read without mmap instead, still weights_only."""
    m = random_model("tiny")
    save_meta_checkpoint(m, tmp_path)
    shard = tmp_path / "consolidated.00.pth"
    torch.save(torch.load(shard, weights_only=True), shard, _use_new_zipfile_serialization=False)
    assert_same_logits(m, load_base(tmp_path))


def test_a_hf_folder_with_a_mistral_params_json_beside_it_loads_as_hf(tmp_path):
    """Mistral's hub repositories hold both layouts: config.json + model-*.safetensors and Mistral's params.json +
    consolidated.safetensors. A download of the whole repository was read as Meta's layout (params.json first) and
    refused; with no consolidated.NN.pth beside params.json, config.json's weights are the checkpoint."""
    pytest.importorskip("transformers")
    from hf_reference import tokens as hf_tokens

    folder, hf, args = hf_folder(tmp_path)
    (folder / "params.json").write_text(json.dumps({"dim": 64, "n_layers": 2, "head_dim": 16, "hidden_dim": 96,
                                                    "n_heads": 4, "n_kv_heads": 2, "norm_eps": 1e-5,
                                                    "vocab_size": 300, "rope_theta": 10000.0}))
    ours = load_base(folder)
    x = hf_tokens(args)
    with torch.no_grad():
        assert (ours(x) - hf(x).logits).abs().max() < 1e-4


def test_a_mistral_sliding_window_bounds_the_positions(tmp_path):
    """A Mistral config's sliding_window (Mistral-7B-v0.1: 4096) limits attention to the last W tokens; this model
    attends to all of them, which is the same up to W tokens: its positions stop at W (max_seq_len), where
    generation stops and past which training refuses samples. Read as the full context, logits past W differed
    from transformers' (0.33 at the 12th token of a window of 4)."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.MistralConfig(vocab_size=100, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, sliding_window=8,
                                     max_position_embeddings=64, attn_implementation="eager")
    torch.manual_seed(0)
    hf = transformers.MistralForCausalLM(cfg).eval()
    hf.save_pretrained(tmp_path / "mistral")
    ours = load_base(tmp_path / "mistral")
    assert ours.args.max_seq_len == 8
    x = torch.randint(0, 100, (1, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (ours(x) - hf(x).logits).abs().max() < 1e-4
    with pytest.raises(ValueError, match="max_seq_len 8 leaves no position"):
        generate(ours, [x[0].tolist()], max_new_tokens=1, eos_id=-1)
    assert [len(out) for out in generate(ours, [x[0, :5].tolist()], max_new_tokens=6, eos_id=-1)] == [3]


def test_a_mis_shaped_hf_tensor_is_named_by_its_file_and_its_own_name(tmp_path):
    """Shapes are checked under Meta's names, which are in none of a Hugging Face checkpoint's files: the error named
    only those and the folder, not the shard and the name the tensor has there."""
    pytest.importorskip("transformers")
    from safetensors.torch import load_file, save_file

    folder, _, _ = hf_folder(tmp_path, shard_size="40KB")
    shard = sorted(folder.glob("model-*.safetensors"))[0]
    state = load_file(shard)
    name = sorted(state)[0]
    state[name] = torch.zeros(3, 3)
    save_file(state, shard, metadata={"format": "pt"})
    with pytest.raises(CheckpointError) as e:
        load_base(folder)
    assert shard.name in str(e.value) and name in str(e.value), str(e.value)


@pytest.mark.parametrize("shape", [(3, 3), (30, 64), (64,)])
def test_a_mis_shaped_hf_query_or_key_is_listed_not_a_traceback(tmp_path, shape):
    """q/k rows are un-permuted as they are read: one of the wrong shape failed inside the permutation (RuntimeError,
    ValueError) instead of being listed as mis-shaped with the rest."""
    pytest.importorskip("transformers")
    from safetensors.torch import load_file, save_file

    folder, _, _ = hf_folder(tmp_path)
    state = load_file(folder / "model.safetensors")
    state["model.layers.0.self_attn.q_proj.weight"] = torch.zeros(shape)
    state["model.layers.1.self_attn.k_proj.weight"] = torch.zeros(shape)
    save_file(state, folder / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"mis-shaped \(2\): layers.0.attention.wq.weight: .*"
                                              r"layers.1.attention.wk.weight: "):
        load_base(folder)


@pytest.mark.parametrize("shape", [(4, 8), (64,)])
def test_a_mis_shaped_lora_b_of_wq_is_listed_not_a_traceback(tmp_path, shape):
    """A LoRA's B of wq/wk is un-permuted as it is read: one of the wrong shape failed inside the permutation."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from llama_adapter.config import LoRAArgs
    from llama_adapter.methods import load_for_training, save_tuned

    save_meta_checkpoint(random_model("tiny"), tmp_path / "base")
    save_tuned(load_for_training("lora", tmp_path / "base", AdapterArgs(), LoRAArgs(), "cpu", torch.float32), "lora",
               tmp_path / "run", base_model=str(tmp_path / "base"))
    weights = tmp_path / "run" / "adapter_model.safetensors"
    with safe_open(weights, "pt") as f:
        header = f.metadata()
    tensors = load_file(weights)
    tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"] = torch.zeros(shape)
    save_file(tensors, weights, metadata=header)
    with pytest.raises(CheckpointError, match=r"LoRA .*adapter_model.safetensors does not match.*mis-shaped \(1\): "
                                              r"layers.0.attention.wq.lora_b"):
        load_model(tmp_path / "base", tmp_path / "run")


def test_saved_weights_are_byte_identical(tmp_path):
    """The same weights give the same bytes: safetensors writes the header's __metadata__ in a random order (a Rust
    HashMap, safetensors#584), so two saves of one adapter differed in their sha256 (the demo DAG's adapters did,
    run after run); the header is written with its metadata keys sorted."""
    import struct

    from llama_adapter.checkpoint import save_full
    from llama_adapter.config import LoRAArgs
    from llama_adapter.lora import add_lora, save_lora

    m = random_model("tiny", AdapterArgs(adapter_len=3, adapter_layers=2))
    full = random_model("tiny")
    lora = add_lora(random_model("tiny"), LoRAArgs(rank=2))
    for name, save in (("adapter", lambda out: save_adapter(m, out / "a.safetensors", base_model="tiny")),
                       ("full", lambda out: save_full(full, out / "full", base_model="tiny")),
                       ("lora", lambda out: save_lora(lora, out / "lora", base_model="tiny"))):
        written = set()
        for i in range(8):
            save(tmp_path / f"{name}{i}")
            (f,) = [p for p in (tmp_path / f"{name}{i}").rglob("*.safetensors")]
            data = f.read_bytes()
            header = json.loads(data[8:8 + struct.unpack("<Q", data[:8])[0]])
            assert list(header["__metadata__"]) == sorted(header["__metadata__"]), name
            written.add(data)
        assert len(written) == 1, f"{name}: {len(written)} different files from 8 saves of the same weights"


def test_meta_checkpoint_is_byte_identical(tmp_path):
    """torch.save names its zip records after the file it writes, here the random partial name (atomic_path), so
    the demo's pre-trained consolidated.00.pth differed in its sha256 from one run to the next with equal tensors;
    written through a file object, the records are named 'archive/...' whatever the file's name."""
    m = random_model("tiny")
    save_meta_checkpoint(m, tmp_path / "a")
    save_meta_checkpoint(m, tmp_path / "b")
    a, b = (tmp_path / d / "consolidated.00.pth" for d in "ab")
    assert a.read_bytes() == b.read_bytes()
    assert_same_logits(m, load_base(tmp_path / "b"))


# ---------------------------------------------------------------- from an audit of checkpoint loading (types)


def edited_json(folder, name, **changes):
    config = json.loads((folder / name).read_text())
    (folder / name).write_text(json.dumps({**config, **changes}))
    return folder


@pytest.mark.parametrize("key, value, expected", [
    ("hidden_size", 64.0, "a positive integer"),  # was a TypeError traceback from torch.empty
    ("num_hidden_layers", 4.0, "a positive integer"),
    ("vocab_size", True, "a positive integer"),
    ("num_key_value_heads", 0, "a positive integer"),  # was 'integer modulo by zero'
    ("rope_theta", "10000", "a positive finite number"),  # was taken as float('10000')
    ("rms_norm_eps", -1e-5, "a positive finite number"),  # was accepted
    ("max_position_embeddings", "2048", "a positive integer"),  # was accepted, a string
    ("tie_word_embeddings", "false", "true or false"),  # bool('false') is True
])
def test_a_hf_config_value_of_the_wrong_type_names_its_key(tmp_path, key, value, expected):
    save_full(random_model("tiny"), tmp_path / "hf", base_model="tiny")
    edited_json(tmp_path / "hf", "config.json", **{key: value})
    with pytest.raises(CheckpointError, match=rf"hf/config.json: {key} {re.escape(repr(value))}: expected {expected}"):
        load_base(tmp_path / "hf")


@pytest.mark.parametrize("key, value", [("dim", 64.0), ("rope_theta", "1e4"), ("tie_embeddings", "no")])
def test_a_params_json_value_of_the_wrong_type_names_its_key(tmp_path, key, value):
    save_meta_checkpoint(random_model("tiny"), tmp_path)
    edited_json(tmp_path, "params.json", **{key: value})
    with pytest.raises(CheckpointError, match=rf"params.json: {key} {re.escape(repr(value))}: expected"):
        load_base(tmp_path)


def test_config_values_transformers_and_meta_releases_write_load_or_name_their_key(tmp_path):
    """Found by a review of the type checks: tie_word_embeddings null (transformers' own default: not tied) was
    refused; a rope_theta beyond the floats was an OverflowError traceback; a rope_theta inside rope_parameters was
    named as a top-level key the file does not have; a Meta release's vocab_size -1 was blamed where the output
    weight was missing."""
    save_full(random_model("tiny"), tmp_path / "hf", base_model="tiny")
    edited_json(tmp_path / "hf", "config.json", tie_word_embeddings=None)
    assert load_base(tmp_path / "hf").args.tie_embeddings is False
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    config.pop("rope_theta", None)
    (tmp_path / "hf" / "config.json").write_text(json.dumps({**config, "rope_parameters": {
        "rope_type": "default", "rope_theta": "5e5"}}))
    with pytest.raises(CheckpointError, match=r"config.json: rope_parameters.rope_theta '5e5': expected a positive"):
        load_base(tmp_path / "hf")
    save_meta_checkpoint(random_model("tiny"), tmp_path / "meta")
    edited_json(tmp_path / "meta", "params.json", rope_theta=10 ** 400)
    with pytest.raises(CheckpointError, match=r"params.json: rope_theta 1000+: expected a positive finite number"):
        load_base(tmp_path / "meta")
    edited_json(tmp_path / "meta", "params.json", rope_theta=10000.0, vocab_size=-1)
    shard = tmp_path / "meta" / "consolidated.00.pth"
    state = torch.load(shard)
    del state["output.weight"]
    torch.save(state, shard)
    with pytest.raises(CheckpointError, match="output.weight") as e:
        load_base(tmp_path / "meta")
    assert "vocab_size" not in str(e.value)


def test_a_config_read_from_a_file_keeps_pythons_number_types(tmp_path):
    """A JSON 10000 for rope_theta and a GGUF's numpy integers are stored as float and int: the same base read
    from another format is then the same ModelArgs, and its JSON (an adapter's header) the same text."""
    import numpy as np

    save_full(random_model("tiny"), tmp_path / "hf", base_model="tiny")
    as_saved = load_base(tmp_path / "hf").args
    edited_json(tmp_path / "hf", "config.json", rope_theta=10000)
    args = load_base(tmp_path / "hf").args
    assert type(args.rope_theta) is float and args == as_saved and json.dumps(args.__dict__) == json.dumps(
        as_saved.__dict__)
    counts = ModelArgs(dim=np.uint32(64), n_layers=np.int64(4), n_heads=4, vocab_size=256, multiple_of=16,
                       max_seq_len=256, norm_eps=np.float32(1e-5))
    assert all(type(getattr(counts, k)) is int for k in ("dim", "n_layers", "hidden_dim"))
    assert type(counts.norm_eps) is float and json.dumps(counts.__dict__)


def test_an_adapter_header_of_a_fractional_length_is_refused(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    m = random_model("tiny", AdapterArgs(adapter_len=3, adapter_layers=2))
    save_meta_checkpoint(m, tmp_path)
    save_adapter(m, tmp_path / "a.safetensors", base_model="tiny")
    with safe_open(tmp_path / "a.safetensors", "pt") as f:
        tensors, header = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
    header["adapter_args"] = json.dumps({"adapter_len": 3.0, "adapter_layers": 2})
    save_file(tensors, tmp_path / "b.safetensors", metadata=header)
    with pytest.raises(CheckpointError, match=r"b.safetensors: damaged adapter header: adapter_args adapter_len 3.0: "
                                              "expected a positive integer"):
        load_model(tmp_path, tmp_path / "b.safetensors")


@pytest.mark.parametrize("key, value", [("rope_scaling", [1.0]), ("rope_parameters", "default")])
def test_rope_settings_that_are_no_object_are_a_checkpoint_error(tmp_path, key, value):
    """An AttributeError ('list' object has no attribute 'get') before."""
    save_full(random_model("tiny"), tmp_path / "hf", base_model="tiny")
    edited_json(tmp_path / "hf", "config.json", **{key: value})
    with pytest.raises(CheckpointError, match=rf"hf/config.json: {key} {re.escape(repr(value))}; expected a JSON obj"):
        load_base(tmp_path / "hf")


def integer_query(s):
    s["adapter_query.weight"] = (s["adapter_query.weight"] * 100).long()


def boolean_gate(s):
    s["layers.3.attention.gate"] = s["layers.3.attention.gate"] != 0


def a_gate_of_two_heads(s):
    s["layers.3.attention.gate"] = torch.zeros(1, 2, 1, 1)


@pytest.mark.parametrize("change, message", [
    (integer_query, r"not floating point \(1\): adapter_query.weight: torch.int64"),  # was cast to float silently
    (boolean_gate, r"not floating point \(1\): layers.3.attention.gate: torch.bool"),
    (lambda s: s.update(extra=torch.zeros(1)), r"unexpected tensors \(1\): extra;"),  # was dropped unread
    (a_gate_of_two_heads, r"layers.N.attention.gate of shapes \[\(1, 2, 1, 1\), \(1, 4, 1, 1\)\]"),  # torch.stack's
])
def test_a_damaged_original_release_is_named_not_cast_or_dropped(tmp_path, change, message):
    adapter = AdapterArgs(adapter_len=3, adapter_layers=2)
    release_pth(random_model("tiny", adapter), tmp_path / "release.pth")
    state = torch.load(tmp_path / "release.pth", weights_only=True)
    change(state)
    torch.save(state, tmp_path / "release.pth")
    with pytest.raises(CheckpointError, match=rf"release.pth: {message}"):
        apply_adapter(random_model("tiny"), tmp_path / "release.pth", adapter)


@pytest.mark.parametrize("key, value", [("alpha_pattern", {"q_proj": 64}), ("rank_pattern", {"v_proj": 4})])
def test_a_peft_lora_of_per_module_alpha_or_rank_is_refused(tmp_path, key, value):
    """PEFT's alpha_pattern gives a module an alpha of its own, which the merge ignored (alpha / r of the config for
    every module: silently wrong weights)."""
    from llama_adapter.config import LoRAArgs
    from llama_adapter.lora import LORA_WEIGHTS, add_lora, save_lora

    save_meta_checkpoint(random_model("tiny"), tmp_path / "base")
    save_lora(add_lora(random_model("tiny"), LoRAArgs(rank=2)), tmp_path / "lora", base_model="tiny")
    edited_json(tmp_path / "lora", "adapter_config.json", **{key: value})
    with pytest.raises(CheckpointError, match=rf"adapter_config.json: {key}={re.escape(repr(value))} is not supported"):
        load_model(tmp_path / "base", tmp_path / "lora" / LORA_WEIGHTS)


@pytest.mark.parametrize("window", ["4096", 0])
def test_a_sliding_window_of_the_wrong_type_names_its_key(tmp_path, window):
    """'<' not supported between instances of 'str' and 'int' before, naming no key."""
    save_full(random_model("tiny"), tmp_path / "hf", base_model="tiny")
    edited_json(tmp_path / "hf", "config.json", sliding_window=window)
    with pytest.raises(CheckpointError, match=rf"hf/config.json: sliding_window {window!r}: expected a positive int"):
        load_base(tmp_path / "hf")


# ---------------------------------------------------------------- from an audit of the LoRA path against the adapter's


def saved_lora(tmp_path, args=None):
    """A base and a LoRA of ours trained on it: (base folder, LoRA folder)."""
    from llama_adapter.config import LoRAArgs
    from llama_adapter.lora import add_lora, save_lora

    save_meta_checkpoint(random_model("tiny"), tmp_path / "base")
    save_lora(add_lora(random_model("tiny"), args or LoRAArgs(rank=2)), tmp_path / "lora", base_model="tiny")
    return tmp_path / "base", tmp_path / "lora"


def saved_adapter(tmp_path):
    """A base and an adapter of ours trained on it: (base folder, adapter file)."""
    m = random_model("tiny", AdapterArgs(adapter_len=3, adapter_layers=2))
    save_meta_checkpoint(m, tmp_path / "base")
    save_adapter(m, tmp_path / "a.safetensors", base_model="tiny")
    return tmp_path / "base", tmp_path / "a.safetensors"


def saved_with_header(tmp_path, kind):
    """A base and an adapter or LoRA of ours trained on it: (base folder, what load_model takes for the adapter or
    LoRA, the weights file holding its header, the kind's name in a damaged header's message)."""
    if kind == "lora":
        base, folder = saved_lora(tmp_path)
        return base, folder, folder / "adapter_model.safetensors", "LoRA"
    base, weights = saved_adapter(tmp_path)
    return base, weights, weights, "adapter"


def rewrite_safetensors(path, header=None, tensors=None):
    """Write `path` again with its header's keys changed by `header` (None: removed) and its tensors by `tensors`
    (None: removed)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(path, "pt") as f:
        old_header, old_tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    header = {k: v for k, v in {**old_header, **(header or {})}.items() if v is not None}
    tensors = {k: v for k, v in {**old_tensors, **(tensors or {})}.items() if v is not None}
    save_file(tensors, path, metadata=header)


@pytest.mark.parametrize("kind", ["adapter", "lora"])
@pytest.mark.parametrize("key, text, problem", [
    ("base_args", "not json", " is not JSON"),  # a LoRA's: a bare JSONDecodeError
    ("base_args", "[64, 4]", " holds a JSON list"),  # a LoRA's: AttributeError from check_trained_on
    ("base_args", '"tiny"', " holds a JSON str"),  # a LoRA's: AttributeError from check_trained_on
    ("base_args", "null", " holds a JSON NoneType"),  # a LoRA's: TypeError from check_trained_on
    ("base_args", None, " is missing"),  # a LoRA's: taken for a PEFT LoRA's header, loaded onto any base
    ("args", "not json", " is not JSON"),  # an adapter's: named no key
    ("args", "[]", " holds a JSON list"),  # an adapter's: 'unknown key(s) []'; a LoRA's: never read
    ("args", None, " is missing"),  # a LoRA's: never read
    ("args", '{"bogus": 1}', r": unknown key\(s\) \['bogus'\]"),  # a LoRA's: never read
])
def test_a_damaged_header_of_an_adapter_or_lora_names_the_file_and_key(tmp_path, kind, key, text, problem):
    """read_lora did not check its header as read_adapter does: base_args of junk text was a bare JSONDecodeError,
    a list or a string an AttributeError from check_trained_on, and its lora_args was never read. Both now check their
    header with one helper: each of base_args and adapter_args / lora_args a JSON object, a damaged one a
    CheckpointError naming the file and key (read_adapter's named no key where the text was no JSON)."""
    base, folder, weights, name = saved_with_header(tmp_path, kind)
    key = f"{kind}_args" if key == "args" else key
    rewrite_safetensors(weights, header={key: text})
    with pytest.raises(CheckpointError, match=rf"{re.escape(str(weights))}: damaged {name} header: {key}{problem}"):
        load_model(base, folder)


def test_a_lora_whose_header_has_another_format_of_ours_is_refused(tmp_path):
    """A LoRA's weights file whose header format is another of this project's (an adapter's) was taken for a PEFT
    LoRA's and loaded onto any base unchecked; PEFT's own header ({'format': 'pt'}) still loads."""
    base, folder = saved_lora(tmp_path)
    weights = folder / "adapter_model.safetensors"
    rewrite_safetensors(weights, header={"format": "llama-adapter/1"})
    with pytest.raises(CheckpointError, match=rf"{re.escape(str(weights))}: header format 'llama-adapter/1' is not a "
                                              r"LoRA's; expected 'llama-adapter/lora/1'"):
        load_model(base, folder)
    rewrite_safetensors(weights, header={"format": "pt", "base_args": None, "lora_args": None, "base_model": None})
    load_model(base, folder)


@pytest.mark.parametrize("change, diff", [
    ({"rank": 4}, r"'rank': \(4, 2\)"),
    ({"alpha": 64.0}, r"'alpha': \(64.0, 16.0\)"),
    ({"dropout": 0.0}, r"'dropout': \(0.0, 0.05\)"),
    ({"targets": ["wq", "wk"]}, r"'targets': \(\['wq', 'wk'\], \['wq', 'wv'\]\)"),
])
def test_a_lora_whose_header_and_adapter_config_disagree_is_refused(tmp_path, change, diff):
    """Our LoRA records its settings in its header (lora_args) and in adapter_config.json, from one save; the
    header's were never read, so a weights file beside another LoRA's adapter_config.json of another alpha was merged
    with that alpha, silently wrong. Settings that differ are refused, naming both files and each setting; the order
    of the targets is no difference (the header keeps the training's, adapter_config.json a sorted list)."""
    from llama_adapter.config import LoRAArgs

    base, folder = saved_lora(tmp_path, LoRAArgs(rank=2, targets=("wv", "wq")))
    load_model(base, folder)
    weights = folder / "adapter_model.safetensors"
    lora_args = {**LoRAArgs(rank=2).to_dict(), **change}
    rewrite_safetensors(weights, header={"lora_args": json.dumps(lora_args)})
    with pytest.raises(CheckpointError, match=rf"{re.escape(str(weights))}: its header's lora_args and "
                                              rf"{re.escape(str(folder / 'adapter_config.json'))} differ in .*{diff}"):
        load_model(base, folder)


@pytest.mark.parametrize("key, text, expected", [
    ("r", '"2"', "r '2': expected a positive integer"),  # int("2"): loaded
    ("r", "2.5", "r 2.5: expected a positive integer"),  # int(2.5): loaded as rank 2
    ("r", "true", "r True: expected a positive integer"),  # rank 1: its tensors called mis-shaped
    ("lora_alpha", '"16"', "lora_alpha '16': expected a positive finite number"),  # float("16"): loaded
    ("lora_alpha", "true", "lora_alpha True: expected a positive finite number"),  # merged with alpha 1
    ("lora_alpha", "NaN", "lora_alpha nan: expected a positive finite number"),  # merged: NaN weights
    ("lora_alpha", "Infinity", "lora_alpha inf: expected a positive finite number"),  # merged: inf weights
    ("lora_alpha", "1" + "0" * 400, "lora_alpha 10+: expected a positive finite number"),  # OverflowError
    ("lora_dropout", '"0.1"', "lora_dropout '0.1': expected a number from 0 to below 1"),  # float("0.1"): loaded
    ("target_modules", "3", r"target_modules 3; expected a list among"),  # TypeError: not iterable
    ("target_modules", '[["q_proj"]]', r"target_modules \[\['q_proj'\]\]; expected a list among"),  # unhashable
    ("target_modules", '{"q_proj": 1, "v_proj": 1}', r"target_modules \{'q_proj': 1, 'v_proj': 1\}; expected a list"),
    ("r", None, "r missing"),  # 'KeyError: 'r''
])
def test_a_lora_config_value_of_the_wrong_type_names_its_key(tmp_path, key, text, expected):
    """adapter_config.json's r, lora_alpha and lora_dropout went through int() and float(): a string or a fraction
    was taken as a number, true as 1, NaN and Infinity merged into the weights, 10**400 an OverflowError; a
    target_modules of a number or of lists was a TypeError, an object taken for its keys. Each is refused, naming
    the file and key as a base's config.json is (LoRAArgs checks its types, as ModelArgs and AdapterArgs do)."""
    base, folder = saved_lora(tmp_path)
    config = folder / "adapter_config.json"
    settings = json.loads(config.read_text())
    del settings[key]
    config.write_text(json.dumps(settings)[:-1] + ("" if text is None else f', "{key}": {text}') + "}")
    with pytest.raises(CheckpointError, match=rf"{re.escape(str(config))}: {expected}"):
        load_model(base, folder)


def test_a_lora_header_setting_of_the_wrong_type_names_its_key(tmp_path):
    """The header's lora_args are checked as adapter_config.json's: a rank of "2" was never refused."""
    base, folder = saved_lora(tmp_path)
    weights = folder / "adapter_model.safetensors"
    rewrite_safetensors(weights, header={"lora_args": json.dumps({"rank": "2"})})
    with pytest.raises(CheckpointError, match=rf"{re.escape(str(weights))}: damaged LoRA header: lora_args rank '2': "
                                              "expected a positive integer"):
        load_model(base, folder)


def test_a_lora_that_does_not_fit_leaves_the_model_as_it_was(tmp_path):
    """apply_lora added the LoRA before checking the file's tensors against it: a file that did not fit left the
    model holding an empty LoRA, which refused the next LoRA as 'holds an adapter or LoRA already' (an adapter that
    does not fit changes nothing), and an r of 10**400 in adapter_config.json was a TypeError from torch.empty.
    The tensors are now checked against the shapes the LoRA would have before it is added."""
    base, folder = saved_lora(tmp_path)
    bad = tmp_path / "bad"
    shutil.copytree(folder, bad)
    rewrite_safetensors(bad / "adapter_model.safetensors",
                        tensors={"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(3, 64)})
    model = load_base(base)
    with pytest.raises(CheckpointError, match=r"mis-shaped \(1\): layers.0.attention.wq.lora_a: \(3, 64\)"):
        apply_adapter(model, bad)
    assert getattr(model, "lora", None) is None and not any("lora" in name for name, _ in model.named_parameters())
    apply_adapter(model, folder)
    huge = tmp_path / "huge"
    shutil.copytree(folder, huge)
    config = json.loads((folder / "adapter_config.json").read_text())
    (huge / "adapter_config.json").write_text(json.dumps({**config, "r": 10**400}))
    rewrite_safetensors(huge / "adapter_model.safetensors", header={"format": "pt"})  # PEFT's: nothing to compare
    with pytest.raises(CheckpointError, match=r"mis-shaped \(16\): layers.0.attention.wq.lora_a: \(2, 64\) "
                                              r"\(expected \(10+, 64\)\)"):
        load_model(base, huge)


def test_two_tensors_of_a_lora_file_for_one_parameter_are_refused(tmp_path):
    """A LoRA file holding one A or B under two names (PEFT's saved name and its in-memory .default. one, or layer 0
    spelled 00) had one of them dropped unread, whichever came last; a base's reader refuses a tensor held twice.
    Both names are given; layers.00 alone is no layer, unexpected as it is in a base's file."""
    base, folder = saved_lora(tmp_path)
    weights = folder / "adapter_model.safetensors"
    name = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    rewrite_safetensors(weights, tensors={name.replace("lora_A.", "lora_A.default."): torch.zeros(2, 64)})
    with pytest.raises(CheckpointError, match=rf"{re.escape(str(weights))}: tensors '.*' and '.*' are both "
                                              r"layers.0.attention.wq.lora_a; expected each LoRA tensor once"):
        load_model(base, folder)
    rewrite_safetensors(weights, tensors={name.replace("lora_A.", "lora_A.default."): None,
                                          name.replace("layers.0.", "layers.00."): torch.zeros(2, 64)})
    with pytest.raises(CheckpointError, match=r"does not match the model: unexpected \(1\): layers.00.attention.wq"):
        load_model(base, folder)


def test_a_mis_shaped_or_integer_lora_tensor_is_named_by_its_own_name(tmp_path):
    """A LoRA's tensors are checked under this model's names (layers.0.attention.wq.lora_a), which are in no LoRA
    file: a mis-shaped or integer one was named only so, where a base's tensors are named by their own name too."""
    base, folder = saved_lora(tmp_path)
    a, b = (f"base_model.model.model.layers.{i}.self_attn.q_proj.lora_{w}.weight" for i, w in ((0, "A"), (1, "B")))
    rewrite_safetensors(folder / "adapter_model.safetensors",
                        tensors={a: torch.zeros(3, 64), b: torch.zeros(64, 2, dtype=torch.int32)})
    with pytest.raises(CheckpointError, match=rf"mis-shaped \(1\): layers.0.attention.wq.lora_a: \(3, 64\) "
                                              rf"\(expected \(2, 64\)\) \({re.escape(a)}\); not floating point \(1\): "
                                              rf"layers.1.attention.wq.lora_b: torch.int32 \({re.escape(b)}\)"):
        load_model(base, folder)


def test_a_peft_bin_without_its_adapter_config_names_the_missing_file(tmp_path):
    """PEFT's pickled weights (adapter_model.bin) without adapter_config.json beside them were read as one of our
    safetensors adapters and called truncated or corrupted; the missing adapter_config.json is named instead."""
    from safetensors.torch import load_file

    base, folder = saved_lora(tmp_path)
    torch.save(load_file(folder / "adapter_model.safetensors"), folder / "adapter_model.bin")
    (folder / "adapter_model.safetensors").unlink()
    load_model(base, folder)
    (folder / "adapter_config.json").unlink()
    with pytest.raises(CheckpointError, match=rf"{re.escape(str(folder / 'adapter_model.bin'))}: a .bin adapter is "
                                              "PEFT's weights, but no adapter_config.json is beside it"):
        load_model(base, folder / "adapter_model.bin")


@pytest.mark.parametrize("key, value", [
    ("layers_to_transform", [0]), ("layers_to_transform", 0), ("layers_pattern", "layers"),
    ("layer_replication", [[0, 2], [1, 2]]), ("modules_to_save", ["lm_head"]), ("lora_bias", True),
    ("target_parameters", ["mlp.down_proj.weight"]), ("exclude_modules", ["q_proj"]), ("use_qalora", True),
    ("trainable_token_indices", [0, 1]), ("alora_invocation_tokens", [5]), ("megatron_config", {"num_layers": 2}),
    ("kasa_config", {}), ("use_bdlora", {}), ("arrow_config", {}), ("monteclora_config", {}),
])
def test_a_peft_lora_option_the_merge_does_not_implement_is_refused(tmp_path, key, value):
    """Only DoRA, rsLoRA, fan_in_fan_out, bias and per-module ranks and alphas were refused: a LoRA of some layers
    only, of other modules too, with a bias on B or any other of PEFT's variants was merged as plain LoRA on every
    layer, silently wrong (or its tensors called unexpected, naming no setting). Each is refused, naming its key
    and value; layers_to_transform 0 (the first layer) is set, though Python holds 0 equal to false, and so is a
    variant's config of {} (PEFT turns the variant on with its default settings)."""
    base, folder = saved_lora(tmp_path)
    edited_json(folder, "adapter_config.json", **{key: value})
    with pytest.raises(CheckpointError, match=rf"adapter_config.json: {key}={re.escape(repr(value))} is not "
                                              "supported; expected a PEFT LoRA"):
        load_model(base, folder)


def test_a_peft_lora_option_this_loader_does_not_know_is_refused_unless_at_its_default(tmp_path):
    """A key of adapter_config.json in none of the loader's lists (an option of a PEFT newer than the one it was
    written against, which may change what the weights mean) was merged past silently. Set, it is refused naming key
    and value; at PEFT's default (null, false, empty: as older PEFTs wrote their enable_lora and merge_weights) the
    LoRA loads."""
    base, folder = saved_lora(tmp_path)
    expected = load_model(base, folder)
    edited_json(folder, "adapter_config.json", use_hyperlora=True)
    with pytest.raises(CheckpointError, match=r"adapter_config.json: use_hyperlora=True \(an option this loader does "
                                              r"not know: a newer PEFT's\?\) is not supported; expected a PEFT LoRA"):
        load_model(base, folder)
    edited_json(folder, "adapter_config.json", use_hyperlora=None, enable_lora=None, merge_weights=False)
    assert_same_logits(load_model(base, folder), expected)


def test_every_option_of_the_installed_peft_lora_config_is_known_to_the_loader():
    """The loader's lists cover every LoraConfig field of the PEFT installed: a PEFT upgrade adding one fails here
    (then: is it an option the merge implements, or one to refuse?), not silently at a user's load."""
    peft = pytest.importorskip("peft")
    from llama_adapter.lora import PEFT_KEYS, PEFT_OTHER_KEYS, PEFT_UNSUPPORTED

    fields = {f.name for f in dataclasses.fields(peft.LoraConfig)}
    assert fields - {*PEFT_KEYS.values(), *PEFT_UNSUPPORTED, *PEFT_OTHER_KEYS} == set()


@pytest.mark.parametrize("init", ["pissa", "pissa_niter_4", "olora", "corda", "loftq", "lora_ga", "mica"])
def test_a_peft_lora_whose_initialisation_rewrites_the_base_is_refused(tmp_path, init):
    """PiSSA, OLoRA, CorDA, MiCA, LoRA-GA and LoftQ subtract the initial B A from the base (or quantise it) when PEFT
    loads the LoRA, so an unconverted LoRA of theirs means W - B0 A0 + B A; merged onto the unchanged base it was
    silently other weights. Refused, naming the setting and the conversion PEFT offers."""
    base, folder = saved_lora(tmp_path)
    edited_json(folder, "adapter_config.json", init_lora_weights=init)
    with pytest.raises(CheckpointError, match=rf"adapter_config.json: init_lora_weights='{init}' \(PEFT rewrites the "
                                              r"base's weights .* path_initial_model_for_weight_conversion\) is not "
                                              "supported"):
        load_model(base, folder)
    edited_json(folder, "adapter_config.json", init_lora_weights="orthogonal")  # the base left as it is: loads
    load_model(base, folder)


def test_peft_lora_options_at_their_default_or_of_training_alone_load(tmp_path):
    """PEFT writes every option of its LoraConfig: null, false or empty where unused, and the initialisation's,
    which do not change what the trained weights mean."""
    base, folder = saved_lora(tmp_path)
    expected = load_model(base, folder)
    edited_json(folder, "adapter_config.json", layers_to_transform=None, layers_pattern=None, layer_replication=None,
                modules_to_save=[], lora_bias=False, target_parameters=[], exclude_modules=None, use_qalora=False,
                qalora_group_size=16, trainable_token_indices=None, alora_invocation_tokens=None,
                megatron_config=None, megatron_core="megatron.core", rank_pattern={}, alpha_pattern={},
                init_lora_weights="gaussian", loftq_config={}, eva_config=None, ensure_weight_tying=False)
    assert_same_logits(load_model(base, folder), expected)


def test_a_peft_lora_naming_a_target_module_twice_loads_as_peft_reads_it(tmp_path):
    """PEFT reads target_modules as a set; a name written twice was refused, its message giving Meta's names
    (['wq', 'wq', 'wv']) under PEFT's key. It is the same LoRA as without the repeat."""
    base, folder = saved_lora(tmp_path)
    expected = load_model(base, folder)
    edited_json(folder, "adapter_config.json", target_modules=["q_proj", "q_proj", "v_proj"])
    assert_same_logits(load_model(base, folder), expected)


@pytest.mark.parametrize("kind", ["adapter", "lora"])
@pytest.mark.parametrize("key, value", [("dim", "64"), ("n_layers", 2.0), ("n_heads", True), ("vocab_size", None),
                                        ("hidden_dim", [176]), ("n_kv_heads", 0)])
def test_a_header_base_args_shape_of_the_wrong_type_is_a_damaged_header(tmp_path, kind, key, value):
    """base_args' structural args were compared with the base's by ==: a "64" or null was called another base, a
    2.0 or true passed as 2 or 1. Each is a damaged header naming the file and key, as ModelArgs checks them; a
    well-typed other value is still another base."""
    base, folder, weights, name = saved_with_header(tmp_path, kind)
    base_args = load_base(base).args.to_dict()
    rewrite_safetensors(weights, header={"base_args": json.dumps({**base_args, key: value})})
    with pytest.raises(CheckpointError, match=rf"{re.escape(str(weights))}: damaged {name} header: base_args {key} "
                                              rf"{re.escape(repr(value))}; expected a positive integer"):
        load_model(base, folder)
    rewrite_safetensors(weights, header={"base_args": json.dumps({**base_args, key: base_args[key] * 2})})
    with pytest.raises(CheckpointError, match=rf"{re.escape(str(weights))}: trained on base 'tiny', which differs "
                                              rf"from this base in .*'{key}': \({base_args[key] * 2}, "):
        load_model(base, folder)


@pytest.mark.parametrize("kind", ["adapter", "lora"])
@pytest.mark.parametrize("key", ["dim", "n_kv_heads", "vocab_size"])
def test_a_header_base_args_without_a_shape_is_a_damaged_header(tmp_path, kind, key):
    """A base_args without one of the base's shapes was called another base ({'dim': (None, 64)}): training writes
    every one, so it is a damaged header naming the file and the missing key."""
    base, folder, weights, name = saved_with_header(tmp_path, kind)
    base_args = load_base(base).args.to_dict()
    del base_args[key]
    rewrite_safetensors(weights, header={"base_args": json.dumps(base_args)})
    with pytest.raises(CheckpointError, match=rf"{re.escape(str(weights))}: damaged {name} header: base_args has no "
                                              rf"{key}; expected every shape"):
        load_model(base, folder)


@pytest.mark.parametrize("kind", ["adapter", "lora"])
@pytest.mark.parametrize("key", ["base_args", "args"])
def test_a_header_setting_given_twice_is_a_damaged_header(tmp_path, kind, key):
    """A header's JSON holding a key twice ({"dim": 128, ..., "dim": 64}) was read with the last value kept silently,
    the first never checked; adapter_config.json's JSON already refused it. It is a damaged header naming the file,
    the header key and the repeated key."""
    from safetensors import safe_open

    base, folder, weights, name = saved_with_header(tmp_path, kind)
    key = f"{kind}_args" if key == "args" else key
    repeated = {"base_args": "dim", "adapter_args": "adapter_len", "lora_args": "rank"}[key]
    with safe_open(weights, "pt") as f:
        text = f.metadata()[key]
    rewrite_safetensors(weights, header={key: f'{{"{repeated}": 128, {text[1:]}'})  # the file's value last
    with pytest.raises(CheckpointError, match=rf"{re.escape(str(weights))}: damaged {name} header: {key} holds key "
                                              rf"'{repeated}' twice; expected a JSON object of settings, each key"):
        load_model(base, folder)


def test_a_missing_bin_adapter_is_named_missing(tmp_path):
    """A .bin path that does not exist (a typo) was said to be PEFT's weights lacking their adapter_config.json;
    the file itself is named missing, as a missing .safetensors adapter is."""
    base, _ = saved_lora(tmp_path)
    missing = tmp_path / "elsewhere" / "adapter_model.bin"
    with pytest.raises(CheckpointError, match=rf"^{re.escape(str(missing))}: no such file"):
        load_model(base, missing)


# ---------------------------------------------------------------- from an audit of checkpoint values (NaN, infinity)


# A NaN and an infinity of each sign, in three weights: each must be found on its own (an infinity is the least or
# the greatest value of its tensor, a NaN neither).
NON_FINITE = {"layers.1.feed_forward.w2.weight": float("nan"), "layers.0.attention.wq.weight": float("inf"),
              "layers.1.attention_norm.weight": -float("inf")}
BLOCKS_OF_32 = ModelArgs(dim=64, n_layers=2, n_heads=4, vocab_size=256, hidden_dim=128)  # rows Q8_0 can quantize


def with_values(model, values, rename=lambda k: k):
    """`model` with values[k] as the second value of its tensor k (`rename`: k's name in the model)."""
    with torch.no_grad():
        for k, v in values.items():
            model.get_parameter(rename(k)).view(-1)[1] = v
    return model


def meta_base(folder, values, n_shards=1):
    save_meta_checkpoint(with_values(random_model(BLOCKS_OF_32), values), folder, n_shards)
    # (the folder to load, where the error says each tensor was read): a tensor merged from several shards, from all
    return folder, lambda k: "consolidated.00.pth" if n_shards == 1 else None


def full_save(folder, values, meta):
    """save_full of a fine-tune of a Meta base (model.safetensors beside params.json, Meta's names) or of any other
    (Hugging Face's layout)."""
    base = folder.with_name(folder.name + "-base")
    if meta:
        save_meta_checkpoint(random_model(BLOCKS_OF_32), base)
    save_full(with_values(random_model(BLOCKS_OF_32), values), folder, base_model=str(base) if meta else "tiny")
    return folder, lambda k: "model.safetensors" if meta else f"model.safetensors: {to_foreign_name(k, 1)}"


def hf_sharded(folder, values):
    """transformers' save_pretrained in shards of 40KB, with their index."""
    pytest.importorskip("transformers")
    from hf_reference import random_hf_llama

    hf = with_values(random_hf_llama(BLOCKS_OF_32), values, lambda k: to_foreign_name(k, 1))
    hf.save_pretrained(folder, max_shard_size="40KB")
    files = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
    return folder, lambda k: f"{files[to_foreign_name(k, 1)]}: {to_foreign_name(k, 1)}"


def gguf_file(folder, values, qtype=None):
    gguf = pytest.importorskip("gguf")
    folder.mkdir()
    write_gguf(folder / "m.gguf", with_values(random_model(BLOCKS_OF_32), values),
               qtype and getattr(gguf.GGMLQuantizationType, qtype))
    return folder / "m.gguf", lambda k: f"m.gguf: {to_foreign_name(k, 2)}"


BASE_LAYOUTS = {
    "meta": meta_base,
    "meta, 2 shards": lambda folder, values: meta_base(folder, values, n_shards=2),
    "full save of a meta base": lambda folder, values: full_save(folder, values, meta=True),
    "full save of a hf base": lambda folder, values: full_save(folder, values, meta=False),
    "hf, sharded": hf_sharded,
    "gguf": gguf_file,
    "gguf, Q8_0": lambda folder, values: gguf_file(folder, values, "Q8_0"),
}


def assert_non_finite_named(error, source, values, origin=lambda k: None, exact=True):
    """`error` names `source` and each tensor of `values` with its counts of NaN and infinite values (those of
    `values`, where `exact`) and where it was read (`origin`)."""
    message = str(error)
    assert message.startswith(f"{source}: tensors holding NaN or infinity ({len(values)}): "), message
    for k, v in values.items():
        counts = (("1 NaN and 0" if math.isnan(v) else "0 NaN and 1") if exact else r"\d+ NaN and \d+") + " infinite"
        where = rf" \({re.escape(origin(k))}\)" if origin(k) else ""
        assert re.search(rf"{re.escape(k)}: {counts} of \d+ values{where}(, |; )", message), (k, message)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # gguf's quantizer, given a NaN
@pytest.mark.parametrize("layout", BASE_LAYOUTS)
def test_a_base_holding_nan_or_infinity_is_refused_naming_its_file_and_tensors(tmp_path, layout):
    """A NaN or an infinity in the weights (a damaged download, a broken conversion) loaded without a word, in every
    layout, and showed only as NaN losses or garbage generations: refused, naming the file each tensor was read from
    and its name there, a GGUF's quantized tensors once dequantized. A finite checkpoint of the layout loads."""
    write = BASE_LAYOUTS[layout]
    path, origin = write(tmp_path / "damaged", NON_FINITE)
    with pytest.raises(CheckpointError) as e:
        load_base(path)
    # Q8_0 quantizes blocks of 32 values by a scale each: a non-finite value spoils its block's scale, so the block
    assert_non_finite_named(e.value, f"{checkpoint_format(path)} checkpoint {path}", NON_FINITE, origin,
                            exact=layout != "gguf, Q8_0")
    load_base(write(tmp_path / "finite", {})[0])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float8_e5m2])
def test_nan_and_infinity_are_found_in_half_and_8_bit_floats(tmp_path, dtype):
    """Releases are mostly bf16 or fp16, a few in 8-bit floats (whose values the check widens: torch's aminmax takes
    none): their NaN and infinities are found as float32's are, and a finite file loads."""
    from safetensors.torch import load_file, save_file

    for name, values in (("damaged", NON_FINITE), ("finite", {})):
        path, origin = full_save(tmp_path / name, values, meta=False)
        weights = path / "model.safetensors"
        save_file({k: v.to(dtype) for k, v in load_file(weights).items()}, weights)
    with pytest.raises(CheckpointError) as e:
        load_base(tmp_path / "damaged")
    assert_non_finite_named(e.value, f"hf checkpoint {tmp_path / 'damaged'}", NON_FINITE, origin)
    assert load_base(tmp_path / "finite").layers[0].attention.wq.weight.dtype == torch.float32


def lora_folder(folder, values):
    from llama_adapter.config import LoRAArgs
    from llama_adapter.lora import LORA_WEIGHTS, add_lora, save_lora

    save_lora(with_values(add_lora(random_model("tiny"), LoRAArgs(rank=2)), values), folder, base_model="tiny")
    return folder, f"LoRA {folder / LORA_WEIGHTS}"


def lora_name(ours: str) -> str:
    """A LoRA tensor's name in the file PEFT's layout writes: layers.0.attention.wq.lora_a is
    base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight."""
    layer, _, target, which = ours.removeprefix("layers.").split(".")
    module = {"wq": "self_attn.q_proj", "wv": "self_attn.v_proj"}[target]
    return f"base_model.model.model.layers.{layer}.{module}.lora_{which[-1].upper()}.weight"


def adapter_file(folder, values, release=False):
    m = with_values(random_model("tiny", AdapterArgs(adapter_len=3, adapter_layers=2)), values)
    folder.mkdir()
    path = folder / ("release.pth" if release else "a.safetensors")
    release_pth(m, path) if release else save_adapter(m, path, base_model="tiny")
    return path, f"adapter {path}"


ADAPTERS = {  # (write, where it puts a NaN and an infinity, each tensor's name in the file where the error gives it)
    "adapter": (adapter_file, {"adapter_query": float("nan"), "adapter_gate": float("inf")}, lambda k: None),
    "original release": (lambda folder, values: adapter_file(folder, values, release=True),
                         {"adapter_query": float("nan"), "adapter_gate": -float("inf")},
                         # the release's own names (the tiny base's top 2 layers adapted), as a LoRA's are given
                         {"adapter_query": "adapter_query.weight",
                          "adapter_gate": "layers.N.attention.gate, N = 2..3"}.get),
    "LoRA": (lora_folder, {"layers.0.attention.wq.lora_a": float("nan"), "layers.1.attention.wv.lora_b": float("inf")},
             lora_name),
}


@pytest.mark.parametrize("kind", ADAPTERS)
def test_an_adapter_holding_nan_or_infinity_is_refused_naming_its_file_and_tensors(tmp_path, kind):
    """As for a base: an adapter or a LoRA holding a NaN or an infinity was put into the model; refused, naming the
    file and the tensors. (PEFT's AdaptionPrompt: test_peft_adaption_prompt's refusals.) A finite one loads."""
    write, values, origin = ADAPTERS[kind]
    save_meta_checkpoint(random_model("tiny"), tmp_path / "base")
    adapter = AdapterArgs(adapter_len=3, adapter_layers=2) if kind == "original release" else None
    path, source = write(tmp_path / "damaged", values)
    with pytest.raises(CheckpointError) as e:
        load_model(tmp_path / "base", path, adapter=adapter)
    assert_non_finite_named(e.value, source, values, origin)
    load_model(tmp_path / "base", write(tmp_path / "finite", {})[0], adapter=adapter)


def test_copies_of_a_tensor_holding_the_same_nan_are_not_called_different(tmp_path):
    """Meta's replicated tensors (norms) must be equal in every shard, and a tied checkpoint's output.weight equal to
    tok_embeddings; torch.equal calls a NaN unequal to itself, so copies damaged alike were refused as differing
    copies, not for their NaN: they are named as non-finite like any other tensor."""
    from safetensors.torch import load_file, save_file

    values = {"norm.weight": float("nan")}
    folder, _ = meta_base(tmp_path / "meta", values, n_shards=2)
    with pytest.raises(CheckpointError) as e:
        load_base(folder)
    assert_non_finite_named(e.value, f"meta checkpoint {folder}", values)

    values = {"tok_embeddings.weight": float("nan")}
    tied = random_model(dataclasses.replace(BLOCKS_OF_32, tie_embeddings=True))
    save_full(with_values(tied, values), tmp_path / "tied", base_model="tiny")
    weights = tmp_path / "tied" / "model.safetensors"
    state = load_file(weights)  # as a tied checkpoint that writes the output all the same
    save_file({**state, "lm_head.weight": state["model.embed_tokens.weight"].clone()}, weights)
    with pytest.raises(CheckpointError) as e:
        load_base(tmp_path / "tied")
    assert_non_finite_named(e.value, f"hf checkpoint {tmp_path / 'tied'}", values,
                            lambda k: f"model.safetensors: {to_foreign_name(k, 1)}")


# A finite value of each sign beyond fp16's ±65504, and one just inside it (rounded to 65504 in the cast: finite).
BEYOND_FP16 = {"layers.0.attention.wq.weight": 70000.0, "layers.1.feed_forward.w2.weight": -1e6}


@pytest.mark.parametrize("layout", ["meta", "full save of a hf base", "gguf"])
def test_a_base_beyond_the_range_of_the_dtype_it_loads_into_is_refused(tmp_path, layout):
    """A finite fp32 weight above 65504 became an infinity when the base was loaded as fp16 (generate/evaluate
    --dtype float16), silently: check_state looked at the values as stored. Refused naming the file, each tensor and
    the dtype's range; the same base loads into bf16 and fp32 (their range is fp32's), and a weight of 65504 loads
    into fp16."""
    path, origin = BASE_LAYOUTS[layout](tmp_path / "wide", {**BEYOND_FP16, "layers.1.attention_norm.weight": 65504.0})
    with pytest.raises(CheckpointError) as e:
        load_base(path, dtype=torch.float16)
    message = str(e.value)
    assert message.startswith(f"{checkpoint_format(path)} checkpoint {path}: tensors holding values beyond the range "
                              "of torch.float16 (±65504), which would load as infinity (2): "), message
    for k in BEYOND_FP16:
        assert f"{k}: values from " in message and f"({origin(k)})" in message, (k, message)
    assert "70000" in message and "-1e+06" in message and "attention_norm" not in message
    for dtype in (torch.bfloat16, torch.float32):
        model = load_base(path, dtype=dtype)
        assert model.layers[0].attention.wq.weight.view(-1)[1].item() == pytest.approx(70000, rel=1e-2)
    path, _ = BASE_LAYOUTS[layout](tmp_path / "fits", {"layers.1.attention_norm.weight": 65504.0})
    assert load_base(path, dtype=torch.float16).layers[1].attention_norm.weight.isfinite().all()


def test_a_lora_whose_merged_weights_exceed_the_dtype_is_refused_and_taken_off(tmp_path):
    """The base and the LoRA were each range-checked as loaded, their merged sum was not: W + (alpha / r) B A of
    65000 + 16000 in an fp16 base became an infinity silently. Refused naming the file, the projection and the dtype's
    range, with nothing merged: the model is the plain base again, and takes a LoRA that fits; the same LoRA merges
    into bf16."""
    from llama_adapter.checkpoint import apply_lora
    from llama_adapter.config import LoRAArgs
    from llama_adapter.lora import add_lora, save_lora

    base, _ = meta_base(tmp_path / "base", {"layers.0.attention.wq.weight": 65000.0})
    lora = add_lora(random_model(BLOCKS_OF_32), LoRAArgs(rank=2, alpha=16))  # scaling 8
    with torch.no_grad():
        wq = lora.layers[0].attention.wq
        wq.lora_a[:, 1], wq.lora_b[0] = 1.0, 1000.0  # B A at [0, 1]: 8 * 2 * 1000 = 16000, on top of 65000
    save_lora(lora, tmp_path / "lora", base_model="tiny")
    weights = tmp_path / "lora" / "adapter_model.safetensors"
    model = load_base(base, dtype=torch.float16)
    trainable = {n: p.requires_grad for n, p in model.named_parameters()}
    with pytest.raises(CheckpointError) as e:
        apply_lora(model, weights)
    message = str(e.value)
    assert message.startswith(f"{weights}: the merged weights W + (alpha / r) B A of 1 projection(s) "
                              "exceed the range of their dtype: layers.0.attention.wq: values from "), message
    assert "to 80992 (torch.float16, ±65504)" in message, message  # 65000 is 64992 in fp16
    assert type(model.layers[0].attention.wq) is torch.nn.Linear and model.lora is None
    assert {n: p.requires_grad for n, p in model.named_parameters()} == trainable
    assert model.layers[0].attention.wq.weight.view(-1)[1].item() == 64992
    with torch.no_grad():
        wq.lora_b[0] = 0.0
    save_lora(lora, tmp_path / "fits", base_model="tiny")
    apply_lora(model, tmp_path / "fits" / "adapter_model.safetensors")
    assert model.merged_lora and model.layers[0].attention.wq.weight.isfinite().all()
    merged = load_model(base, tmp_path / "lora", dtype=torch.bfloat16).layers[0].attention.wq.weight
    assert merged.view(-1)[1].item() == pytest.approx(81000, rel=1e-2)
