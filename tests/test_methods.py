"""The baseline methods against independent references: our LoRA against PEFT's LoRA on Hugging Face's LLaMA
(logits and gradients, tiny configurations with MHA, GQA and tied embeddings), our LoRA files loaded by
PeftModel.from_pretrained, full fine-tunes read back as bases (and by transformers), and each method's file
holding exactly what trained."""

import json

import pytest
import torch
from hf_reference import tokens

from llama_adapter.checkpoint import PEFT_CONFIG, apply_adapter, load_base, load_model
from llama_adapter.config import LORA_TARGETS, AdapterArgs, LoRAArgs, ModelArgs
from llama_adapter.errors import CheckpointError
from llama_adapter.lora import LORA_WEIGHTS, add_lora, is_lora_param, merge_lora, save_lora
from llama_adapter.methods import WEIGHTS, load_for_training, save_tuned, trains, tuned_state

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")


def peft_lora(hf, lora: LoRAArgs):
    config = peft.LoraConfig(r=lora.rank, lora_alpha=lora.alpha, lora_dropout=0.0, task_type="CAUSAL_LM",
                             target_modules=[{"wq": "q_proj", "wk": "k_proj", "wv": "v_proj", "w1": "gate_proj",
                                              "w2": "down_proj"}[t] for t in lora.targets])
    return peft.get_peft_model(hf, config)


def randomise_lora(model, seed=3):
    """B starts at zero (the update is nil): give every A and B random values so parity means something."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if is_lora_param(name):
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


TARGETS = [("wq", "wv"), ("wq", "wk", "wv", "w1", "w2")]


@pytest.mark.parametrize("targets", TARGETS, ids=["alpaca-lora", "wide"])
def test_lora_matches_peft_logits_and_gradients(hf_base, targets, tmp_path):
    hf, path, args = hf_base
    lora = LoRAArgs(rank=4, alpha=8, dropout=0.0, targets=targets)
    ours = add_lora(load_base(path), lora).eval()
    randomise_lora(ours)
    save_lora(ours, tmp_path / "lora", str(path))
    reference = peft.PeftModel.from_pretrained(hf, tmp_path / "lora", is_trainable=True).eval()
    x = tokens(args)
    ours_logits, ref_logits = ours(x), reference(input_ids=x).logits
    assert (ours_logits - ref_logits).abs().max().item() < 1e-4
    assert (ours_logits - load_base(path)(x)).abs().max().item() > 1e-2  # the LoRA changes the output
    ours_logits.logsumexp(-1).sum().backward()
    ref_logits.logsumexp(-1).sum().backward()
    ref_grads = dict(reference.named_parameters())
    compared = 0
    for i in range(args.n_layers):
        for t in targets:
            module = {"wq": "self_attn.q_proj", "wk": "self_attn.k_proj", "wv": "self_attn.v_proj",
                      "w1": "mlp.gate_proj", "w2": "mlp.down_proj"}[t]
            part = "attention" if t.startswith("wq") or t in ("wk", "wv") else "feed_forward"
            ours_layer = getattr(getattr(ours.layers[i], part), t)
            ref_a = ref_grads[f"base_model.model.model.layers.{i}.{module}.lora_A.default.weight"].grad
            ref_b = ref_grads[f"base_model.model.model.layers.{i}.{module}.lora_B.default.weight"].grad
            ours_b = ours_layer.lora_b.grad
            if t in ("wq", "wk"):  # our rows are Meta's interleaved rotary pairs; HF's are halves
                from llama_adapter.checkpoint import permute_rope_rows

                ours_b = permute_rope_rows(ours_b, args.n_heads if t == "wq" else args.n_kv_heads)
            torch.testing.assert_close(ours_layer.lora_a.grad, ref_a, atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(ours_b, ref_b, atol=1e-4, rtol=1e-4)
            compared += 2
    assert compared == 2 * args.n_layers * len(targets)


def test_fresh_lora_is_the_base_and_trains_only_a_and_b(tmp_path):
    m = ModelArgs.from_name("tiny-gqa")
    torch.manual_seed(0)
    from llama_adapter.model import Transformer

    base = Transformer(m).eval()
    lora = add_lora(Transformer(m).eval(), LoRAArgs(rank=2))
    lora.load_state_dict(base.state_dict(), strict=False)
    x = tokens(m)
    assert torch.equal(base(x), lora(x))  # B = 0: the update is exactly nil
    trainable = {n for n, p in lora.named_parameters() if p.requires_grad}
    assert trainable == {n for n, _ in lora.named_parameters() if trains("lora", n)}
    assert len(trainable) == 2 * 2 * m.n_layers
    per_layer = 2 * (m.dim + m.n_heads * m.head_dim) + 2 * (m.dim + m.n_kv_heads * m.head_dim)  # wq, wv; rank 2
    assert sum(p.numel() for n, p in lora.named_parameters() if n in trainable) == m.n_layers * per_layer


def test_alpaca_lora_parameter_count_on_7b():
    """The paper's efficiency table: Alpaca-LoRA tunes 4.2M parameters of LLaMA-7B (rank 8 on wq and wv)."""
    from llama_adapter.model import Transformer

    with torch.device("meta"):
        model = add_lora(Transformer(ModelArgs.from_name("7B")), LoRAArgs())
    assert sum(p.numel() for p in tuned_state(model, "lora").values()) == 4_194_304


def test_lora_targets_are_the_projections_the_tensor_table_names():
    """LoRA's names for a projection (Meta's, its block part, HF's module) come from checkpoint.TENSOR_NAMES; the
    torch-free list of targets the CLI offers (config.LORA_TARGETS) is the same projections."""
    from llama_adapter.checkpoint import PROJECTIONS

    assert tuple(PROJECTIONS) == LORA_TARGETS
    assert PROJECTIONS["wq"] == ("attention", "self_attn.q_proj")
    assert PROJECTIONS["w2"] == ("feed_forward", "mlp.down_proj")


def test_merged_lora_equals_unmerged(hf_base):
    _, path, args = hf_base
    model = add_lora(load_base(path), LoRAArgs(rank=4, targets=("wq", "wk", "wv"))).eval()
    randomise_lora(model)
    x = tokens(args)
    with torch.no_grad():
        before = model(x)
        after = merge_lora(model)(x)
    assert (before - after).abs().max().item() < 1e-5
    assert not any(is_lora_param(n) for n, _ in model.named_parameters())


def test_a_lora_applied_to_a_loaded_inference_model_takes_effect(hf_base, tmp_path):
    """generate_requests applies adapters to a model loaded for inference, its projections already fused (the
    forward then reads the fused weights): the merged LoRA is laid out into them again, so the model answers as
    one with the LoRA merged before fusing. An int8 model is refused (a LoRA merges into full precision)."""
    _, path, args = hf_base
    model = add_lora(load_base(path), LoRAArgs(rank=4, targets=("wq", "wv", "w1"))).eval()
    randomise_lora(model)
    save_lora(model, tmp_path / "run", str(path))
    x = tokens(args)
    with torch.no_grad():
        expected = load_model(path, tmp_path / "run" / LORA_WEIGHTS).eval()(x)
        fused = load_base(path).eval().requires_grad_(False).fuse_projections()
        plain = fused(x)
        apply_adapter(fused, tmp_path / "run" / LORA_WEIGHTS)
        assert (fused(x) - expected).abs().max().item() < 1e-5 and (plain - expected).abs().max().item() > 1e-3
    pytest.importorskip("torchao")
    from llama_adapter.quantize import quantize_int8

    int8 = quantize_int8(load_base(path).eval().requires_grad_(False))
    with pytest.raises(CheckpointError, match="apply it before quantize_int8"):
        apply_adapter(int8, tmp_path / "run" / LORA_WEIGHTS)


def test_our_lora_file_loads_in_peft_and_back(hf_base, tmp_path):
    hf, path, args = hf_base
    model = add_lora(load_base(path), LoRAArgs(rank=4)).eval()
    randomise_lora(model)
    save_lora(model, tmp_path / "run", str(path))
    config = json.loads((tmp_path / "run" / PEFT_CONFIG).read_text())
    assert config["peft_type"] == "LORA" and sorted(config["target_modules"]) == ["q_proj", "v_proj"]
    from safetensors import safe_open

    with safe_open(tmp_path / "run" / LORA_WEIGHTS, "pt") as f:  # exactly what trained: A and B of every target
        assert set(f.keys()) == {f"base_model.model.model.layers.{i}.self_attn.{m}_proj.lora_{w}.weight"
                                 for i in range(args.n_layers) for m in "qv" for w in "AB"}
    x = tokens(args)
    with torch.no_grad():
        ours = model(x)
        theirs = peft.PeftModel.from_pretrained(hf, tmp_path / "run").eval()(input_ids=x).logits
        reloaded = load_model(path, tmp_path / "run" / LORA_WEIGHTS).eval()(x)
    assert (ours - theirs).abs().max().item() < 1e-4
    assert (ours - reloaded).abs().max().item() < 1e-5


def test_peft_trained_lora_loads_onto_our_model(hf_base, tmp_path):
    """A LoRA trained elsewhere with PEFT (its own tensor names, no header of ours) evaluates here."""
    hf, path, args = hf_base
    reference = peft_lora(hf, LoRAArgs(rank=4, targets=("wq", "wk", "wv")))
    randomise_lora(reference)
    reference.save_pretrained(tmp_path / "peft")
    reference.save_pretrained(tmp_path / "pickled", safe_serialization=False)  # adapter_model.bin
    x = tokens(args)
    with torch.no_grad():
        expected = reference.eval()(input_ids=x).logits
        ours = load_model(path, tmp_path / "peft" / LORA_WEIGHTS).eval()(x)
        pickled = load_model(path, tmp_path / "pickled").eval()(x)
    assert (ours - expected).abs().max().item() < 1e-4
    assert (tmp_path / "pickled" / "adapter_model.bin").is_file() and torch.equal(pickled, ours)


def test_lora_refuses_unsupported_and_stacking(hf_base, tmp_path):
    _, path, _ = hf_base
    model = add_lora(load_base(path), LoRAArgs(rank=2))
    save_lora(model, tmp_path / "run", str(path))
    config = json.loads((tmp_path / "run" / PEFT_CONFIG).read_text())
    (tmp_path / "run" / PEFT_CONFIG).write_text(json.dumps({**config, "use_dora": True}))
    with pytest.raises(CheckpointError, match="use_dora=True is not supported"):
        load_model(path, tmp_path / "run" / LORA_WEIGHTS)
    (tmp_path / "run" / PEFT_CONFIG).write_text(json.dumps(config))
    merged = load_model(path, tmp_path / "run" / LORA_WEIGHTS)
    with pytest.raises(CheckpointError, match="holds an adapter or LoRA already"):
        apply_adapter(merged, tmp_path / "run" / LORA_WEIGHTS)
    adapter = tmp_path / "adapter.safetensors"
    save_tuned(load_base(path, AdapterArgs(2, 1)), "adapter", tmp_path, str(path))
    with pytest.raises(CheckpointError, match="merged LoRA"):
        apply_adapter(merged, adapter)


@pytest.mark.parametrize("layout", ["hf", "meta"])
def test_full_fine_tune_is_a_base_in_the_base_layout(hf_base, tmp_path, layout):
    hf, path, args = hf_base
    if layout == "meta":
        from llama_adapter.checkpoint import save_meta_checkpoint

        save_meta_checkpoint(load_base(path), tmp_path / "meta")
        path = tmp_path / "meta"
    model = load_for_training("full", path, AdapterArgs(), LoRAArgs(), "cpu", torch.float32)
    assert all(p.requires_grad for p in model.parameters())
    with torch.no_grad():  # a fine-tune moved every weight
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    written = save_tuned(model, "full", tmp_path / "run", str(path))
    assert written == tmp_path / "run" / WEIGHTS["full"]
    assert (written.parent / ("params.json" if layout == "meta" else "config.json")).is_file()
    x = tokens(args)
    with torch.no_grad():
        expected = model(x)
        assert torch.equal(load_base(written.parent)(x), expected)
        if layout == "hf":  # Hugging Face's own loader reads it as the same model
            theirs = transformers.LlamaForCausalLM.from_pretrained(written.parent).eval()(x).logits
            assert (theirs - expected).abs().max().item() < 1e-4


def test_each_method_saves_exactly_what_trains(tmp_path):
    from llama_adapter.checkpoint import save_meta_checkpoint
    from llama_adapter.model import Transformer

    torch.manual_seed(0)
    save_meta_checkpoint(Transformer(ModelArgs.from_name("tiny-tied")), tmp_path / "base")
    for method in ("adapter", "lora", "full"):
        model = load_for_training(method, tmp_path / "base", AdapterArgs(3, 2), LoRAArgs(rank=2), "cpu", torch.float32)
        trained = {n for n, p in model.named_parameters() if p.requires_grad}
        assert trained == set(tuned_state(model, method)) and trained
        written = save_tuned(model, method, tmp_path / method, str(tmp_path / "base"))
        from safetensors import safe_open

        with safe_open(written, "pt") as f:
            assert len(f.keys()) == len(trained), method
    with pytest.raises(ValueError, match="zero-shot trains nothing"):
        load_for_training("zero-shot", tmp_path / "base", AdapterArgs(), LoRAArgs(), "cpu", torch.float32)


def test_save_tuned_takes_a_str_folder(tmp_path):
    """save_tuned takes its folder as str or Path, as save_adapter and load_model do (a str was a raw TypeError
    from `str / str`)."""
    from llama_adapter.checkpoint import save_meta_checkpoint
    from llama_adapter.model import Transformer

    save_meta_checkpoint(Transformer(ModelArgs.from_name("tiny")), tmp_path / "base")
    for method in ("adapter", "lora", "full"):
        model = load_for_training(method, tmp_path / "base", AdapterArgs(3, 2), LoRAArgs(rank=2), "cpu", torch.float32)
        written = save_tuned(model, method, str(tmp_path / method), str(tmp_path / "base"))
        assert written == tmp_path / method / WEIGHTS[method] and written.is_file()
