"""Decoding: left-padded batches with the adapter on, sampling rules, EOS handling."""

import json

import pytest
import torch
from torch import nn

from llama_adapter.adapter import AdaptedTransformer
from llama_adapter.config import AdapterArgs, ModelArgs, Sampling
from llama_adapter.generate import DecodeGraphs, generate, sample_next
from llama_adapter.model import Transformer
from llama_adapter.tokenizer import Tokenizer


@pytest.fixture
def model():
    torch.manual_seed(0)
    adapter = AdapterArgs(adapter_len=4, adapter_layers=3, gate_init="random")
    return AdaptedTransformer(ModelArgs.from_name("tiny-gqa"), adapter).eval()


def test_adapter_depends_on_absolute_position(model):
    """Why generation gives each row its own RoPE positions: plain attention is shift-invariant, the adapter
    is not (rotated queries, position-free prompt keys), as in the paper's code and PEFT's."""
    x = torch.randint(0, 256, (1, 8))
    shifted = torch.arange(5, 13)
    with torch.no_grad():
        assert (model(x) - model(x, positions=shifted)).abs().max() > 1e-3
        model.adapter_gate.zero_()
        assert (model(x) - model(x, positions=shifted)).abs().max() < 1e-4


def test_left_padded_batch_matches_each_prompt_alone(model):
    prompts = [[1, 5, 9, 200, 7], [1, 42], [1, 3, 3, 3, 3, 3, 3, 3, 8]]
    batched = generate(model, prompts, max_new_tokens=8, eos_id=2, pad_id=0)
    with torch.no_grad():
        for prompt, out in zip(prompts, batched):
            assert len(out) == 8
            # every greedy token is the argmax of the unpadded sequence's own full forward pass
            logits = model(torch.tensor([prompt + out]))[0, len(prompt) - 1: len(prompt) - 1 + len(out)]
            chosen = logits.gather(-1, torch.tensor(out)[:, None]).squeeze(-1)
            assert (logits.max(-1).values - chosen).max() < 1e-4


def test_output_is_cut_at_eos(model):
    [free] = generate(model, [[1, 5]], max_new_tokens=6, eos_id=-1)
    eos = free[2]
    [cut] = generate(model, [[1, 5]], max_new_tokens=6, eos_id=eos)
    assert cut == free[: free.index(eos)]


def test_sampling_rules():
    logits = torch.tensor([[0.0, 3.0, 2.9, -5.0]]).expand(200, 4)
    assert set(sample_next(logits, temperature=0, top_p=0.75).tolist()) == {1}
    draws = set(sample_next(logits, 1.0, 0.75, seeds=torch.arange(200)).tolist())
    assert draws == {1, 2}  # token 1 alone has < 0.75 of the mass, tokens 1+2 reach it; 0 and 3 never
    assert set(sample_next(logits, 1.0, 0.01, seeds=torch.arange(200)).tolist()) == {1}


def test_bad_requests():
    m = Transformer(ModelArgs.from_name("tiny"))
    with pytest.raises(ValueError, match="at least one token"):
        generate(m, [[]], 3, eos_id=2)
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(m, [[1]], 0, eos_id=2)


def test_multimodal_decoding_matches_the_full_forward_of_each_row():
    """The image values cached at the prefill give every decoded token what a full forward with the image
    gives; a row without an image decodes as the text-only model."""
    torch.manual_seed(0)
    model = AdaptedTransformer(ModelArgs.from_name("tiny-gqa"),
                        AdapterArgs(adapter_len=4, adapter_layers=3, gate_init="random", visual_dim=12)).eval()
    with torch.no_grad():  # an image term large enough to change the tokens
        model.adapter_gate.fill_(2.0)
        for p in model.adapter_visual.parameters():
            p.mul_(30)
    prompts, images = [[1, 5, 9, 200, 7], [1, 5, 9, 200, 7]], [torch.randn(12).numpy(), None]
    batched = generate(model, prompts, max_new_tokens=8, eos_id=2, pad_id=0, images=images)
    assert batched[0] != batched[1]
    with torch.no_grad():
        for prompt, image, out in zip(prompts, images, batched):
            tokens = torch.tensor([prompt + out])
            extra = {} if image is None else {"image_features": torch.from_numpy(image)[None],
                                              "image_index": torch.zeros_like(tokens)}
            logits = model(tokens, **extra)[0, len(prompt) - 1: len(prompt) - 1 + len(out)]
            chosen = logits.gather(-1, torch.tensor(out)[:, None]).squeeze(-1)
            assert (logits.max(-1).values - chosen).max() < 1e-4
    assert generate(model, prompts[1:], max_new_tokens=8, eos_id=2, pad_id=0) == batched[1:]


def test_compiled_decode_step_compiles_once_for_every_batch(model):
    """A job's batches (one prompt, three, sixteen, each with its own longest prompt, so its own prompt and KV cache
    lengths) share one compiled decode step and one compiled prefill: filler rows bring each batch to the job's
    rows, and the prompt and cache lengths are dynamic. A recompilation would be an error (fail_on_recompile).
    Greedy tokens are the eager step's. The blocks are compiled, not the step: one graph per kind of block (plain
    and adapted) for the decode step and one for the prefill, whatever the number of layers."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    model = model.requires_grad_(False).fuse_projections()
    g = torch.Generator().manual_seed(0)
    for n, longest in [(1, 5), (3, 30), (16, 60)]:
        prompts = [[1] + torch.randint(3, 256, (int(torch.randint(1, longest, (1,), generator=g)),),
                                       generator=g).tolist() for _ in range(n)]
        with torch.compiler.set_stance("fail_on_recompile" if n > 1 else "default"):
            compiled = generate(model, prompts, max_new_tokens=8, eos_id=-1, compile=True, rows=16)
        assert compiled == generate(model, prompts, max_new_tokens=8, eos_id=-1)
    assert 0 < model.first_adapted_layer() < len(model.layers)
    assert counters["stats"]["unique_graphs"] == 4


def test_compiled_decode_step_serves_adapters_of_any_length_and_more_row_counts(model):
    """Adapters of different lengths (adapter_len) taking turns in one process, as generate_requests runs them,
    share one compiled decode step and prefill: the prompt length is dynamic. Each length compiled an adapted
    block of its own before, and the ninth length in a process failed at dynamo's recompile limit. Another row
    count compiles again (the batch is static), beyond dynamo's recompile limit too: the decode step's own limit
    holds (here the process's limit is lowered to 2, which the second row count's graphs pass)."""
    from dataclasses import replace

    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    model = model.requires_grad_(False).fuse_projections()
    prompts = [[1, 5, 9, 200, 7], [1, 42]]
    with torch._dynamo.config.patch(recompile_limit=2):
        try:
            for k, adapter_len in enumerate([4, 6, 2, 9, 3, 5, 7, 8, 10, 11]):
                model.set_adapter(replace(model.adapter, adapter_len=adapter_len))
                model.requires_grad_(False)
                with torch.compiler.set_stance("fail_on_recompile" if k > 0 else "default"):
                    compiled = generate(model, prompts, max_new_tokens=6, eos_id=-1, compile=True, rows=2)
                assert compiled == generate(model, prompts, max_new_tokens=6, eos_id=-1)
            assert counters["stats"]["unique_graphs"] == 4
            compiled = generate(model, prompts, max_new_tokens=6, eos_id=-1, compile=True, rows=3)
            assert compiled == generate(model, prompts, max_new_tokens=6, eos_id=-1)
            assert counters["stats"]["unique_graphs"] == 8
        finally:
            torch._dynamo.reset()  # its graphs would count against later tests' recompile limits


def test_adapters_of_other_lengths_share_a_decoding_cache_file(model, tmp_path):
    """The compile cache's file for a decode step is named after what its compiled code depends on: not the
    adapter's length (the graphs serve any), but its image path (visual_dim) and the rows."""
    from dataclasses import replace

    from llama_adapter.generate import decoding_cache

    def file_for(adapter, rows=2):
        model.set_adapter(adapter)
        with decoding_cache(str(tmp_path), model, rows) as path:
            return path

    text = model.adapter  # adapter_len 4
    four = file_for(text)
    assert file_for(replace(text, adapter_len=9)) == four
    assert file_for(replace(text, adapter_len=9, visual_dim=8)) != four
    assert file_for(text, rows=3) != four


@pytest.mark.parametrize("order", ["one-token batch last", "one-token batch first"])
def test_a_batch_of_one_token_prompts_compiles_no_prefill_of_its_own(model, order):
    """A batch whose longest prompt is one token (a request of BOS alone) is served by the job's compiled prefill,
    dynamic in the prompt length, whichever batch comes first: no recompilation, the eager step's tokens."""
    torch._dynamo.reset()
    model = model.requires_grad_(False).fuse_projections()
    batches = [[[1, 5, 9, 200, 7], [1, 42]], [[1], [1]], [[1, 3, 3]]]
    if order == "one-token batch first":
        batches = batches[1:2] + batches[:1] + batches[2:]
    for k, prompts in enumerate(batches):
        with torch.compiler.set_stance("fail_on_recompile" if k > 0 else "default"):
            compiled = generate(model, prompts, max_new_tokens=6, eos_id=-1, compile=True, rows=2)
        assert compiled == generate(model, prompts, max_new_tokens=6, eos_id=-1)


def test_filler_rows_change_no_answer(model):
    prompts = [[1, 5, 9, 200, 7], [1, 42]]
    assert generate(model, prompts, max_new_tokens=6, eos_id=-1, rows=5) == generate(model, prompts, 6, eos_id=-1)
    with pytest.raises(ValueError, match="rows"):
        generate(model, prompts, max_new_tokens=6, eos_id=-1, rows=1)


class ByteTokenizer(Tokenizer):
    """Each byte of the text one id (3..255): any text, no vocabulary file."""

    def __init__(self):
        super().__init__(bos_id=1, eos_id=2, pad_id=0, vocab_size=256)

    def _encode(self, text: str) -> list[int]:
        return [3 + b % 253 for b in text.encode()]

    def _decode(self, ids: list[int]) -> str:
        return " ".join(map(str, ids))

    def pieces(self) -> list[str | None]:
        return [None, None, None, *(f"<byte {i}>" for i in range(3, 256))]


def test_complete_texts_batches_prompts_of_like_length_and_answers_in_the_prompts_order(model, monkeypatch):
    """Batches of prompts of similar length, longest first (a batch is padded to its longest prompt); each text
    comes back at its prompt's place, the same as the prompt decoded alone."""
    import llama_adapter.generate as decoding

    text = "Which of these states is farthest north? Options: (A) Maine (B) Texas (C) Ohio"
    prompts = [text[:n] for n in (3, 40, 5, 38, 4, 41, 6, 39)]
    batches = []
    generate_batch = decoding.generate
    monkeypatch.setattr(decoding, "generate", lambda m, ids, *a, **k: batches.append([len(i) for i in ids])
                        or generate_batch(m, ids, *a, **k))
    texts = decoding.complete_texts(model, ByteTokenizer(), prompts, Sampling(max_new_tokens=5), batch_size=2)
    assert batches == [[42, 41], [40, 39], [7, 6], [5, 4]]  # BOS included
    alone = [decoding.complete_texts(model, ByteTokenizer(), [p], Sampling(max_new_tokens=5), batch_size=1)[0]
             for p in prompts]
    assert texts == alone and len(set(texts)) > 1


@pytest.mark.parametrize("bad", [{"max_new_tokens": 0}, {"temperature": -0.5}, {"top_p": 0.0}, {"top_p": 1.5}])
def test_sampling_out_of_range_is_refused_where_it_is_made(bad):
    """Not decoded as something else and recorded under its own name (a negative temperature decodes greedily,
    which `describe`, written with every answer, would call sampling)."""
    with pytest.raises(ValueError, match=f"{next(iter(bad))}="):
        Sampling(**bad)


def test_a_kept_decode_step_serves_the_next_call_of_the_same_shapes(model):
    """generate(graphs=...) keeps its caches and step inputs for the next call of the same shapes: the caches are
    the same tensors, refilled, and the answers those of a fresh call, though the kept cache held the last call's
    keys where this call's rows are padded. Another cache length or adapter takes fresh ones; gates changed in place
    refill the kept prompt values; a call without graphs decodes in caches of its own; leaving the block frees the
    caches. Between calls the kept caches and prompt values are the DecodeGraphs' (`state`), not the model's."""
    long_rows = [[1, 5, 9, 200, 7, 8, 11, 12], [1, 42, 43, 44, 45, 46, 47, 48]]
    short_rows = [[1, 5, 9], [1, 3, 3, 3, 3, 3, 3, 8]]  # more padding, over slots the last call filled
    calls = [(long_rows, 6), (short_rows, 6), (long_rows, 6), (short_rows[:1], 6)]
    expected = [generate(model, rows, n, eos_id=-1, rows=2) for rows, n in calls]
    longer = generate(model, short_rows, 9, eos_id=-1)
    with torch.no_grad():
        model.adapter_gate.mul_(-1)
    flipped = generate(model, short_rows, 9, eos_id=-1)
    assert flipped != longer  # the gates matter to these answers
    with torch.no_grad():
        model.adapter_gate.mul_(-1)
    with DecodeGraphs(model) as graphs:
        for k, (rows, n) in enumerate(calls):
            assert generate(model, rows, n, eos_id=-1, rows=2, graphs=graphs) == expected[k]
            if k == 0:
                (cache, _), (_, prompt_kv), key = graphs.state[0], graphs.state[-1], graphs.key
            assert graphs.state[0][0] is cache and graphs.key == key  # kept, not set up anew
            assert graphs.state[-1][1] is prompt_kv
            assert model.layers[0].attention.kv_cache is None and model.layers[-1].attention.prompt_kv is None
        assert generate(model, long_rows, 6, eos_id=-1, rows=2) == expected[0]  # without graphs: its own caches
        assert generate(model, short_rows, 9, eos_id=-1, graphs=graphs) == longer  # another cache length
        assert graphs.state[0][0] is not cache and graphs.key != key
        key = graphs.key
        with torch.no_grad():
            model.adapter_gate.mul_(-1)  # in place: the same tensors, the kept prompt values refilled
        assert generate(model, short_rows, 9, eos_id=-1, graphs=graphs) == flipped and graphs.key == key
        model.set_adapter(AdapterArgs(adapter_len=2, adapter_layers=2, gate_init="random"))  # other tensors
        other = generate(model, short_rows, 9, eos_id=-1, graphs=graphs)
        assert graphs.key != key
    assert model.layers[0].attention.kv_cache is None
    assert other == generate(model, short_rows, 9, eos_id=-1)


@pytest.mark.parametrize("base", ["float", "int8", "inference"])
def test_kept_prompt_values_are_computed_again_only_when_what_they_hold_changes(model, monkeypatch, base):
    """A kept call's prompt keys and values are computed once and left as they are while the adapter's prompts and
    gates and the adapted layers' wk/wv stay the same; a change computes them again: to the prompts or gates
    (through `.data` too), a wk/wv weight written in place or replaced, a LoRA put on wv, its weights changed (in
    place, or with no version counted, as a fused optimizer writes) or its training flag; the adapter taken out.
    A base made under inference_mode (no version counts) has them computed at every call. Every call's answers
    are those of a fresh call."""
    import contextlib

    from llama_adapter.adapter import AdaptedAttention
    from llama_adapter.config import LoRAArgs
    from llama_adapter.lora import add_lora
    from llama_adapter.quantize import int8_weight, quantize_int8

    mode = torch.inference_mode() if base == "inference" else contextlib.nullcontext()
    with mode:
        if base == "inference":  # the model's tensors made again as inference tensors
            model = AdaptedTransformer(model.args, model.adapter).eval()
        if base == "int8":
            quantize_int8(model.fuse_projections())
    computed, compute = [], AdaptedAttention.prompt_keys_values

    def counting(self, *args):
        computed.append(self)
        return compute(self, *args)

    monkeypatch.setattr(AdaptedAttention, "prompt_keys_values", counting)
    rows = [[1, 5, 9], [1, 3, 3, 3, 8]]
    adapted = model.adapter.adapter_layers
    last = model.layers[-1].attention

    def lora_on_wv():  # no dropout: its training flag changes no answer
        add_lora(model, LoRAArgs(rank=2, dropout=0.0, targets=("wv",)), generator=torch.Generator().manual_seed(1))
        model.eval().layers[-1].attention.wv.lora_b.normal_()

    changes = {
        "float": [lambda: model.adapter_gate.data.mul_(-1),  # through .data: the version stays, the values change
                  lambda: model.adapter_query.data[0, 0].add_(1.0),
                  lambda: last.wv.weight.copy_(last.wv.weight.flip(0)),  # the base written in place
                  lambda: setattr(last.wk, "weight", nn.Parameter(last.wk.weight.flip(0), requires_grad=False)),
                  lora_on_wv,
                  lambda: model.layers[-1].attention.wv.lora_b.mul_(2),  # the LoRA's weights in place
                  lambda: model.layers[-1].attention.wv.lora_a.data.mul_(2),  # no version, as a fused optimizer's
                  lambda: model.layers[-1].attention.wv.train()],
        "int8": [lambda: model.adapter_gate.data.mul_(-1),
                 lambda: setattr(last.wk, "weight", nn.Parameter(  # replaced (its rows were views of wqkv's)
                     int8_weight(last.wk.weight.dequantize().flip(0)), requires_grad=False))],
        "inference": [],
    }[base]
    with mode, DecodeGraphs(model) as graphs:
        expected = generate(model, rows, 5, eos_id=-1)
        computed.clear()
        for _ in range(3):
            assert generate(model, rows, 5, eos_id=-1, graphs=graphs) == expected
        assert len(computed) == adapted * (3 if base == "inference" else 1)  # otherwise left as they were
        for change in changes:
            with torch.no_grad():
                change()
            expected = generate(model, rows, 5, eos_id=-1)
            computed.clear()
            assert generate(model, rows, 5, eos_id=-1, graphs=graphs) == expected
            assert len(computed) == adapted
        assert model.prompt_kv_made is None and graphs.prompt_kv_made is not None  # kept beside the values
        model.set_adapter(None)  # nothing to compute and nothing to vouch for
        assert generate(model, rows, 5, eos_id=-1, graphs=graphs) == generate(model, rows, 5, eos_id=-1)
    assert graphs.prompt_kv_made is None  # freed with the kept step


def test_a_kept_call_that_fails_leaves_no_cache_on_the_model(model, monkeypatch):
    """A kept call that fails while setting up its caches leaves none on the model: a forward after it reads the
    adapter as it is (gates changed since the kept prompt values were computed), and the next call decodes as a
    fresh one."""
    from llama_adapter.adapter import AdaptedAttention

    rows, x = [[1, 5, 9], [1, 3, 3, 3, 8]], torch.tensor([[1, 5, 9, 10]])
    with DecodeGraphs(model) as graphs:
        generate(model, rows, 5, eos_id=-1, graphs=graphs)
        with torch.no_grad():
            model.adapter_gate.mul_(-1)
            expected = model(x)
        with monkeypatch.context() as patch:
            patch.setattr(AdaptedAttention, "prompt_keys_values", lambda *args: 1 / 0)
            with pytest.raises(ZeroDivisionError):
                generate(model, rows, 5, eos_id=-1, graphs=graphs)
        assert all(layer.attention.kv_cache is None and layer.attention.prompt_kv is None for layer in model.layers)
        assert model.prompt_kv_made is None
        with torch.no_grad():
            torch.testing.assert_close(model(x), expected, rtol=0, atol=0)
        assert generate(model, rows, 5, eos_id=-1, graphs=graphs) == generate(model, rows, 5, eos_id=-1)


LONG_ROWS = [[1, 5, 9, 200, 7, 8, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20], [1, 42, 43]]  # 16 + 6 tokens: cache 32
SHORT_ROWS = [[1, 5, 9], [1, 3, 3, 3, 3, 8]]  # 6 + 6: cache 16


def test_between_kept_calls_the_model_is_as_without_them(model):
    """Inside the block, between calls, the model holds no cache and no prompt values: a forward reads the adapter
    as it is now (gates changed in place since the last call), a training step reaches it, and a call without
    graphs (a one-off check, a request with an image) leaves the kept step for the next call of its shapes."""
    x = torch.tensor([[1, 5, 9, 10]])
    with DecodeGraphs(model) as graphs:
        generate(model, SHORT_ROWS, 6, eos_id=-1, graphs=graphs)
        (cache, _), key = graphs.state[0], graphs.key
        with torch.no_grad():
            model.adapter_gate.mul_(-1)
            inside = model(x)
        loss = model(x).float().logsumexp(-1).mean()
        loss.backward()
        assert model.adapter_gate.grad is not None
        expected = generate(model, SHORT_ROWS, 6, eos_id=-1)  # without graphs: caches of its own
        assert generate(model, SHORT_ROWS, 6, eos_id=-1, graphs=graphs) == expected
        assert graphs.state[0][0] is cache and graphs.key == key
    with torch.no_grad():
        torch.testing.assert_close(inside, model(x), rtol=0, atol=0)


def test_a_kept_step_of_another_shape_is_freed_before_the_next_call_allocates(model, monkeypatch):
    """Peak memory stays one call's: a call of another cache length frees the kept caches before it allocates its
    own (complete_texts decodes its longest batch first so that one too large fails at once)."""
    import llama_adapter.model as model_module

    allocated_while_kept, init = [], model_module.KVCache.__init__

    def recording_init(self, *args, **kwargs):
        allocated_while_kept.append(graphs.state is not None or graphs.storages != [])
        init(self, *args, **kwargs)

    with DecodeGraphs(model) as graphs:
        generate(model, LONG_ROWS, 6, eos_id=-1, graphs=graphs)
        monkeypatch.setattr(model_module.KVCache, "__init__", recording_init)
        assert generate(model, SHORT_ROWS, 6, eos_id=-1, graphs=graphs) == generate(model, SHORT_ROWS, 6, eos_id=-1)
    assert allocated_while_kept[:len(model.layers)] == [False] * len(model.layers)


def test_a_call_in_inference_mode_and_one_outside_share_a_block(model):
    """Tensors made under inference_mode cannot be refilled outside it (nor the step's inputs): such a call's step
    is not kept for a call outside it, nor the other way round."""
    expected = generate(model, SHORT_ROWS, 6, eos_id=-1)
    with DecodeGraphs(model) as graphs:
        with torch.inference_mode():
            assert generate(model, SHORT_ROWS, 6, eos_id=-1, graphs=graphs) == expected
        assert generate(model, SHORT_ROWS, 6, eos_id=-1, graphs=graphs) == expected
        with torch.inference_mode():
            assert generate(model, SHORT_ROWS, 6, eos_id=-1, graphs=graphs) == expected


def test_leaving_the_block_lets_the_model_go():
    """Once its block is left a DecodeGraphs holds nothing of the model (a caller may keep the object), and serves
    no second block."""
    import gc
    import weakref

    model = AdaptedTransformer(ModelArgs.from_name("tiny-gqa"), AdapterArgs(adapter_len=4, adapter_layers=3)).eval()
    graphs = DecodeGraphs(model)
    with graphs:
        generate(model, SHORT_ROWS, 6, eos_id=-1, graphs=graphs)
    alive = weakref.ref(model)
    del model
    gc.collect()
    assert alive() is None
    with pytest.raises(ValueError, match="one `with` block"), graphs:
        pass


def recorded_logits(monkeypatch, call):
    """(tokens, every step's logits) of call(), sampled (temperature > 0: each step's logits pass through
    sample_next; a greedy step takes its argmax inside the step)."""
    import llama_adapter.generate as decoding

    seen, sample = [], decoding.sample_next
    monkeypatch.setattr(decoding, "sample_next",
                        lambda logits, *a, **k: seen.append(logits.clone()) or sample(logits, *a, **k))
    out = call()
    monkeypatch.setattr(decoding, "sample_next", sample)
    return out, torch.stack(seen)


def test_a_kept_decode_step_gives_a_fresh_calls_logits_and_draws(model, monkeypatch):
    """Each kept call's logits are a fresh call's, and sampling from a generator seeded alike, its draws: a kept
    input not refilled (RoPE positions shifted by padding) changes logits before it changes a tiny model's argmax."""
    calls = [[[1, 5, 9, 200, 7, 8, 11, 12], [1, 42, 43, 44, 45, 46, 47, 48]], [[1, 5, 9], [1, 3, 3, 3, 3, 3, 3, 8]],
             [[1, 5, 9, 200, 7, 8, 11, 12]]]

    def run(rows, graphs=None):
        g = torch.Generator().manual_seed(7)
        return generate(model, rows, 6, eos_id=-1, temperature=0.8, top_p=0.9, generator=g, rows=2, graphs=graphs)

    fresh = [recorded_logits(monkeypatch, lambda r=r: run(r)) for r in calls]
    with DecodeGraphs(model) as graphs:
        for (tokens, logits), rows in zip(fresh, calls):
            kept_tokens, kept_logits = recorded_logits(monkeypatch, lambda: run(rows, graphs))
            assert kept_tokens == tokens
            torch.testing.assert_close(kept_logits, logits, rtol=0, atol=1e-6)


def test_a_non_finite_value_of_one_call_does_not_reach_the_next(model):
    """A masked cache slot still enters attention as 0 * value: a kept cache is zeroed as a fresh one is, so a NaN
    written by one batch (an overflow, a bad embedding) does not spoil the next batch of the same shapes."""
    with torch.no_grad():
        model.tok_embeddings.weight[99] = float("nan")  # a token only the first call holds
    first, later = [[1, 5, 9, 200, 7, 8, 11, 99]], [[1, 5, 9]]  # one cache length (16) for 6 new tokens
    expected = generate(model, later, 6, eos_id=-1)
    with DecodeGraphs(model) as graphs:
        generate(model, first, 6, eos_id=-1, graphs=graphs)
        key = graphs.key
        assert generate(model, later, 6, eos_id=-1, graphs=graphs) == expected and graphs.key == key


def test_decode_graphs_serve_their_own_model_inside_their_block(model):
    """Outside its `with` block a DecodeGraphs would leave the caches on the model (a later training step would
    run through them, its adapter without a gradient); another model's would free the wrong caches: refused."""
    with pytest.raises(ValueError, match="inside its `with` block"):
        generate(model, [[1, 5]], 4, eos_id=-1, graphs=DecodeGraphs(model))
    other = AdaptedTransformer(ModelArgs.from_name("tiny-gqa"), AdapterArgs(adapter_len=4, adapter_layers=3)).eval()
    with DecodeGraphs(other) as graphs, pytest.raises(ValueError, match="of this model"):
        generate(model, [[1, 5]], 4, eos_id=-1, graphs=graphs)
    assert model.layers[0].attention.kv_cache is None and model(torch.tensor([[1, 5]])).requires_grad


def test_decoding_stays_within_the_models_max_seq_len(model):
    """A prompt and its answer fit the model's max_seq_len (256 here), as in the paper's released code (its
    total_len is at most max_seq_len): a prompt that leaves no position for a new token is refused, and each row's
    answer stops where its sequence reaches the limit, whatever the batch (positions past it are ones the model
    never saw; they were decoded silently)."""
    limit = model.args.max_seq_len
    g = torch.Generator().manual_seed(0)
    long = [1] + torch.randint(3, 256, (limit - 5,), generator=g).tolist()  # 4 positions left
    with pytest.raises(ValueError, match=f"prompt 1 has {limit} tokens.*max_seq_len {limit}"):
        generate(model, [[1, 5], long + [7] * 4], max_new_tokens=3, eos_id=-1)
    short = [1, 5, 9]
    batched = generate(model, [short, long], max_new_tokens=10, eos_id=-1)
    assert [len(out) for out in batched] == [10, 4]
    assert batched == [generate(model, [p], max_new_tokens=10, eos_id=-1)[0] for p in (short, long)]
    assert generate(model, [long], max_new_tokens=3, eos_id=-1)[0] == batched[1][:3]
    from llama_adapter.generate import complete_texts

    with pytest.raises(ValueError, match=rf"prompt 'xxxx.*\.\.\. is {limit} tokens \(BOS included\).*max_seq_len"):
        complete_texts(model, ByteTokenizer(), ["ab", "x" * (limit - 1)], Sampling(max_new_tokens=2))


def test_a_prompt_too_long_is_named_by_its_file_line_and_id(model, tmp_path):
    """A --prompts request that leaves no position for a new token is refused naming the file, its line and the id
    the file gave it (it was named by its text alone); an id not given is the line number, not said twice."""
    from llama_adapter.generate import generate_requests, read_prompts

    too_long = "x" * model.args.max_seq_len  # BOS and one token per byte: no position left
    for path, second, name in [(tmp_path / "with_id.jsonl", {"id": "long", "prompt": too_long}, "line 2 (id 'long')"),
                               (tmp_path / "no_id.jsonl", {"prompt": too_long}, "line 2")]:
        path.write_text(f'{{"prompt": "ab"}}\n{json.dumps(second)}\n')
        with pytest.raises(ValueError) as e:
            generate_requests(model, ByteTokenizer(), read_prompts(path), {"base": None}, Sampling(max_new_tokens=2),
                              source=f"--prompts {path}")
        assert str(e.value).startswith(f"--prompts {path}, {name}: prompt 'xxx"), str(e.value)
        assert str(e.value).endswith(f"expected at most {model.args.max_seq_len - 1} tokens")



def test_a_later_adapters_prompt_too_long_is_refused_before_any_answer(model, monkeypatch):
    """Requests go to their adapters in turn; one too long for the base among the second adapter's is refused
    before the first adapter decodes anything (it was found only at its adapter's turn, after the others' work)."""
    import llama_adapter.generate as generate_module

    decoded = []
    monkeypatch.setattr(generate_module, "generate", lambda *a, **k: decoded.append(a) or [[5]] * len(a[1]))
    requests = [{"id": "short", "prompt": "ab", "adapter": "first"},
                {"id": "long", "prompt": "x" * model.args.max_seq_len, "adapter": "second"}]
    with pytest.raises(ValueError, match=r"^requests \(id 'long'\): prompt 'xxx.*leaves no position"):
        generate_module.generate_requests(model, ByteTokenizer(), requests, {"first": None, "second": None},
                                          Sampling(max_new_tokens=2))
    assert decoded == []

@pytest.mark.parametrize("request_", [{"id": "blank", "instruction": " ", "input": "context"},
                                      {"id": "blank", "prompt": ""}])
def test_generate_requests_refuses_a_blank_request_before_any_answer(model, monkeypatch, request_):
    """A request whose instruction (an input beside it is only its context) or raw prompt is blank asks nothing:
    generate_requests refuses it by its id before anything is decoded, as read_prompts refuses its line."""
    import llama_adapter.generate as generate_module
    from llama_adapter.errors import InputError

    decoded = []
    monkeypatch.setattr(generate_module, "generate", lambda *a, **k: decoded.append(a) or [[5]] * len(a[1]))
    key = "prompt" if "prompt" in request_ else "instruction"
    expect = rf"^requests \(id 'blank'\): '{key}' is blank \(.*\); expected a non-blank {key}"
    with pytest.raises(InputError, match=expect):
        generate_module.generate_requests(model, ByteTokenizer(), [{"id": "ok", "prompt": "ab"}, request_],
                                          {"base": None}, Sampling(max_new_tokens=2))
    assert decoded == []


def test_a_sampled_answer_does_not_depend_on_the_batch(model):
    """Each prompt's draws are its own (a seed per prompt, drawn from the generator in the prompts' order): its
    sampled answer is the same at any batch size, beside any other prompts and with filler rows (a compiled job's
    last batch). One generator's draws shared by the rows made each answer depend on all of these."""
    from llama_adapter.generate import complete_texts

    sampling = Sampling(max_new_tokens=6, temperature=1.0, top_p=0.9)
    prompts = ["abc", "hello there", "x", "some longer prompt text"]

    def sampled(texts, batch_size):
        return complete_texts(model, ByteTokenizer(), texts, sampling, batch_size,
                              generator=torch.Generator().manual_seed(0))

    alone = sampled(prompts, 1)
    assert sampled(prompts, 4) == sampled(prompts, 3) == alone
    assert sampled(prompts[:2], 4) == alone[:2]  # the prompts after them change nothing
    assert alone != complete_texts(model, ByteTokenizer(), prompts, Sampling(max_new_tokens=6))  # not greedy
    ids = [[1, 5, 9], [1, 42, 43, 44]]
    assert (generate(model, ids, 6, -1, 0, 1.0, 0.9, seeds=[3, 4], rows=4)
            == generate(model, ids, 6, -1, 0, 1.0, 0.9, seeds=[3, 4])
            == [generate(model, [p], 6, -1, 0, 1.0, 0.9, seeds=[s])[0] for p, s in zip(ids, [3, 4])])


def test_seeded_draws_follow_the_nucleus():
    """Drawn from a row's seed and step, a token comes from the top-p set in proportion to its probability."""
    logits = torch.tensor([[0.0, 3.0, 2.9, -5.0]]).expand(4000, 4)
    draws = sample_next(logits, 1.0, 0.75, seeds=torch.arange(4000), step=7)
    assert set(draws.tolist()) == {1, 2}
    p = torch.softmax(logits[0], -1)
    assert abs((draws == 1).float().mean().item() - (p[1] / (p[1] + p[2])).item()) < 0.03
    again = sample_next(logits[:10], 1.0, 0.75, seeds=torch.arange(10), step=7)
    assert torch.equal(again, draws[:10])
    assert not torch.equal(sample_next(logits, 1.0, 0.75, seeds=torch.arange(4000), step=8), draws)
