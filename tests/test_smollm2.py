"""The real SmolLM2-135M-Instruct GGUF (from the package registry) through our GGUF loader and tokenizer."""

import pytest

from llama_adapter.checkpoint import load_base
from llama_adapter.config import ModelArgs
from llama_adapter.generate import generate
from llama_adapter.prompts import chatml_prompt
from llama_adapter.tokenizer import load_tokenizer

HEALTH_WORDS = {"water", "hydrated", "exercise", "sleep", "diet", "fruits", "vegetables", "active", "balanced"}


@pytest.fixture(scope="module")
def smollm2(smollm2_gguf):
    return load_base(smollm2_gguf).eval(), load_tokenizer(smollm2_gguf)


def test_architecture_matches_preset(smollm2):
    model, tokenizer = smollm2
    preset = ModelArgs.from_name("SmolLM2-135M")
    for field in ("dim", "n_layers", "n_heads", "n_kv_heads", "hidden_dim", "vocab_size", "rope_theta",
                  "tie_embeddings"):
        assert getattr(model.args, field) == getattr(preset, field), field
    assert model.output.weight is model.tok_embeddings.weight
    assert tokenizer.vocab_size == preset.vocab_size


def test_greedy_decode_is_sensible_english(smollm2):
    model, tokenizer = smollm2
    prompt = tokenizer.encode(chatml_prompt("Give three tips for staying healthy."))
    [out] = generate(model, [prompt], max_new_tokens=40, eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id)
    text = tokenizer.decode(out)
    words = {w.strip(".,:;!*").lower() for w in text.split()}
    assert len(words & HEALTH_WORDS) >= 2, text
    assert text.lstrip().startswith("1."), text  # a numbered list of tips
    assert sum(c.isascii() for c in text) / len(text) > 0.98, text


def test_left_padded_batch_equals_single_prompts(smollm2):
    model, tokenizer = smollm2
    prompts = [tokenizer.encode(chatml_prompt(q)) for q in ("What is the capital of France?", "Name a primary colour.")]
    assert len(prompts[0]) != len(prompts[1])
    batched = generate(model, prompts, max_new_tokens=12, eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id)
    singles = [generate(model, [p], max_new_tokens=12, eos_id=tokenizer.eos_id)[0] for p in prompts]
    assert batched == singles
    assert "Paris" in tokenizer.decode(batched[0])
