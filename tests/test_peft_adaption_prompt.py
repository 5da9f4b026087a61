"""PEFT AdaptionPrompt adapters trained elsewhere, evaluated here: the imported adapter against PEFT's own model on
Hugging Face's LLaMA (tiny configurations with MHA, GQA and tied embeddings), in a forward pass and in greedy
decoding; what cannot be imported refused with one line naming the file; a PEFT folder's peft_type deciding
between LoRA and AdaptionPrompt; the command line taking one."""

import json

import pytest
import torch
from hf_reference import random_hf_llama, tokens
from safetensors.torch import load_file, save_file
from test_cli import run_cli

from llama_adapter.checkpoint import (
    PEFT_CONFIG,
    PEFT_GATE,
    PEFT_PROMPT,
    load_base,
    load_model,
    read_peft_adaption_prompt,
)
from llama_adapter.config import AdapterArgs, LoRAArgs, ModelArgs
from llama_adapter.errors import CheckpointError
from llama_adapter.generate import generate
from llama_adapter.lora import LORA_WEIGHTS, add_lora, is_lora_file, save_lora

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

GATES = (0.3, -0.5, 0.9)  # PEFT's gate of each adapted layer: nonzero, of both signs
WEIGHTS = "adapter_model.safetensors"


def peft_adaption_prompt(hf, out, adapter_len=3, gates=GATES, **save):
    """`hf` wrapped in PEFT's AdaptionPrompt on its top len(gates) layers, random prompts, saved to `out`."""
    config = peft.AdaptionPromptConfig(adapter_len=adapter_len, adapter_layers=len(gates), task_type="CAUSAL_LM")
    model = peft.get_peft_model(hf, config).eval()
    adapted = [m for m in model.modules() if type(m).__name__ == "AdaptedAttention"]
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for m, gate in zip(adapted, gates, strict=True):
            m.adaption_prompt.copy_(torch.randn(m.adaption_prompt.shape, generator=g))
            m.adaption_gate.fill_(gate)
    model.save_pretrained(out, **save)
    return model


def test_peft_adaption_prompt_gives_peft_logits_and_tokens(hf_base, tmp_path):
    hf, path, args = hf_base
    reference = peft_adaption_prompt(hf, tmp_path / "peft")
    ours = load_model(path, tmp_path / "peft").eval()
    x = tokens(args)
    with torch.no_grad():
        logits = ours(x)
        assert (logits - reference(input_ids=x).logits).abs().max().item() < 1e-5
        assert (logits - load_base(path)(x)).abs().max().item() > 1e-2  # the adapter matters: parity is not vacuous
        theirs = reference.generate(input_ids=x, max_new_tokens=6, min_new_tokens=6, do_sample=False)
    assert generate(ours, x.tolist(), 6, eos_id=-1) == theirs[:, x.shape[1]:].tolist()
    assert torch.allclose(ours.adapter_gate.tanh(), torch.tensor(GATES)[:, None].expand(-1, args.n_heads))


@pytest.mark.parametrize("form", ["weights file", "bin folder"])
def test_peft_weights_file_or_pickle(tmp_path, form):
    """The weights file (adapter_config.json beside it) stands for its folder; PEFT's torch pickle reads too."""
    args = ModelArgs.from_name("tiny-gqa")
    hf = random_hf_llama(args, tmp_path / "hf")
    reference = peft_adaption_prompt(hf, tmp_path / "peft", safe_serialization=form == "weights file")
    path = tmp_path / "peft" / WEIGHTS if form == "weights file" else tmp_path / "peft"
    x = tokens(args)
    with torch.no_grad():
        assert (load_model(tmp_path / "hf", path)(x) - reference(input_ids=x).logits).abs().max().item() < 1e-5


@pytest.fixture
def saved(tmp_path):
    """A tiny HF LLaMA (4 layers, dim 64) and a PEFT AdaptionPrompt of its top 3 layers: their folders."""
    hf = random_hf_llama(ModelArgs.from_name("tiny"), tmp_path / "hf")
    peft_adaption_prompt(hf, tmp_path / "peft")
    return tmp_path / "hf", tmp_path / "peft"


def edit_config(folder, **changes):
    config = json.loads((folder / PEFT_CONFIG).read_text())
    (folder / PEFT_CONFIG).write_text(json.dumps({**config, **changes}))


def edit_tensors(folder, change):
    tensors = load_file(folder / WEIGHTS)
    change(tensors)
    save_file(tensors, folder / WEIGHTS)


def gates_at_one(t):
    t[PEFT_GATE.format(i=2)] = torch.tensor([1.0])
    t[PEFT_GATE.format(i=3)] = torch.tensor([-1.5])


def trained_on_a_deeper_model(t):  # 5 layers, the top 3 adapted: layers 2..4
    for i in (3, 2, 1):
        for name in (PEFT_PROMPT, PEFT_GATE):
            t[name.format(i=i + 1)] = t.pop(name.format(i=i))


def trained_on_a_narrower_model(t):
    for i in (1, 2, 3):
        t[PEFT_PROMPT.format(i=i)] = t[PEFT_PROMPT.format(i=i)][..., :32].contiguous()


def non_finite_prompts(t):
    t[PEFT_PROMPT.format(i=1)][0, 0, 1] = float("nan")
    t[PEFT_PROMPT.format(i=3)][0, 2, 0] = float("inf")


REFUSALS = {
    "NaN or infinity": (  # was loaded, as in any other file (test_checkpoint's tests of non-finite values)
        lambda f: edit_tensors(f, non_finite_prompts),
        rf"PEFT AdaptionPrompt .*{WEIGHTS}: tensors holding NaN or infinity \(2\): "
        r"base_model.model.model.layers.1.self_attn.adaption_prompt: 1 NaN and 0 infinite of 192 values, "
        r"base_model.model.model.layers.3.self_attn.adaption_prompt: 0 NaN and 1 infinite of 192 values; "),
    "gate at or beyond ±1": (
        lambda f: edit_tensors(f, gates_at_one),
        rf"{WEIGHTS}: adaption_gate of layer 2: 1.0, layer 3: -1.5; .* only PEFT gates in \(-1, 1\)"),
    "another peft_type": (
        lambda f: edit_config(f, peft_type="PREFIX_TUNING"),
        rf"{PEFT_CONFIG}: peft_type 'PREFIX_TUNING' is not supported; expected ADAPTION_PROMPT"),
    "not a LLaMA": (
        lambda f: edit_config(f, target_modules="attn"),
        rf"{PEFT_CONFIG}: target_modules 'attn' is not a LLaMA-family model's attention"),
    "more layers than the base": (
        lambda f: edit_config(f, adapter_layers=5),
        rf"{PEFT_CONFIG}: adapter_layers 5 exceeds the 4 layers of the base"),
    "layers beyond the base": (
        lambda f: edit_tensors(f, trained_on_a_deeper_model),
        rf"{WEIGHTS}: adapts layers \[4\], but PEFT adapts the top 3 of the base's 4 layers, 1..3"),
    "another hidden size": (
        lambda f: edit_tensors(f, trained_on_a_narrower_model),
        r"mis-shaped \(3\): base_model.model.model.layers.1.self_attn.adaption_prompt: \(1, 3, 32\) "
        r"\(expected \(1, 3, 64\)\)"),
    "a missing tensor": (
        lambda f: edit_tensors(f, lambda t: t.pop(PEFT_GATE.format(i=3))),
        r"missing \(1\): base_model.model.model.layers.3.self_attn.adaption_gate"),
    "no weights file": (
        lambda f: (f / WEIGHTS).unlink(),
        rf"a PEFT adapter folder \({PEFT_CONFIG}\) without adapter_model.safetensors or adapter_model.bin"),
}


@pytest.mark.parametrize("case", REFUSALS)
def test_unimportable_adapters_are_one_clear_line(saved, case):
    base, folder = saved
    damage, message = REFUSALS[case]
    damage(folder)
    with pytest.raises(CheckpointError, match=message) as e:
        load_model(base, folder)
    assert str(folder) in str(e.value) and "\n" not in str(e.value)


def test_an_adapter_shape_other_than_the_peft_configs_is_refused(saved):
    """adapter_config.json records the adapter's shape: another one given is refused naming both, not dropped."""
    base, folder = saved
    with pytest.raises(CheckpointError) as e:
        load_model(base, folder, adapter=AdapterArgs(adapter_len=3, adapter_layers=2))
    assert str(e.value).startswith(f"{folder}: adapter_layers 2 given, but the file records its own shape, "
                                   f"adapter_layers {len(GATES)};")
    assert load_model(base, folder, adapter=AdapterArgs(adapter_len=3, adapter_layers=len(GATES))).adapter


def test_peft_type_decides_lora_or_adaption_prompt(saved, tmp_path):
    base, folder = saved
    save_lora(add_lora(load_base(base), LoRAArgs(rank=2)), tmp_path / "lora", str(base))
    assert is_lora_file(tmp_path / "lora") and is_lora_file(tmp_path / "lora" / LORA_WEIGHTS)
    assert not is_lora_file(folder) and not is_lora_file(folder / WEIGHTS)
    assert load_model(base, tmp_path / "lora").merged_lora  # a LoRA folder still loads as a LoRA, merged
    assert load_model(base, folder).adapter.adapter_layers == len(GATES)
    with pytest.raises(CheckpointError, match=r"a PEFT LoRA \(peft_type 'LORA'\), not an AdaptionPrompt adapter"):
        read_peft_adaption_prompt(tmp_path / "lora" / PEFT_CONFIG, tmp_path / "lora" / LORA_WEIGHTS,
                                  ModelArgs.from_name("tiny"))


def test_complete_with_a_peft_adaption_prompt(tmp_path, llama_sp_model):
    hf = random_hf_llama(ModelArgs(dim=32, n_layers=2, n_heads=2, vocab_size=32000, hidden_dim=64), tmp_path / "hf")
    peft_adaption_prompt(hf, tmp_path / "peft", gates=(0.5, -0.5))
    outputs = []
    for adapter in (tmp_path / "peft" / WEIGHTS, tmp_path / "peft"):  # the weights file, or PEFT's folder
        proc = run_cli("complete", "--base", str(tmp_path / "hf"), "--adapter", str(adapter),
                       "--tokenizer", str(llama_sp_model), "--prompt", "Name a colour.", "--max-new-tokens", "2")
        assert proc.returncode == 0, proc.stderr
        outputs.append(proc.stdout)
    assert outputs[0].strip() and outputs[0] == outputs[1]  # random weights: some text, not sense; the same
