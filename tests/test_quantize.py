"""--quantize int8 and int8-g32: weight-only int8 of the blocks' linear layers (torchao), on the CPU.

Tolerances: per-row int8 rounds each weight to a step of max|row| / 127, an error of about a quarter of a
percent of the row's scale, so the tiny model's logits move by well under 1% (measured 0.24%, asserted < 1%).
SmolLM2 (dim 576, trained weights with outlier rows) moves further: measured 4.8% in fp32 on the text below,
asserted < 8%; its next token, read at every position of that text, agrees at 96% of them, asserted >= 90%.
With a scale per 32 inputs (int8-g32) 2.4% and 100%, asserted < 4% and >= 98% (deterministic on the CPU; the
margins are for other torch/torchao releases). Speed is the GPU's
(BENCHMARKS.md): on the CPU torchao dequantizes, which is slower, not faster.
"""

from dataclasses import replace

import pytest
import torch

from llama_adapter.adapter import AdaptedTransformer
from llama_adapter.config import QUANTIZATIONS, AdapterArgs, ModelArgs
from llama_adapter.errors import InputError
from llama_adapter.generate import generate
from llama_adapter.quantize import float8_matmuls, int8_format, int8_group_size, quantize_int8

pytest.importorskip("torchao")


def pair(args: ModelArgs, adapter: AdapterArgs | None = None, group_size: int | None = None):
    """The same frozen weights twice, projections fused as inference loads them; the second quantized."""
    torch.manual_seed(0)
    models = [AdaptedTransformer(args, adapter).eval() for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    for m in models:
        m.requires_grad_(False).fuse_projections()
    return models[0], quantize_int8(models[1], group_size)


# tiny-gqa with a feed-forward width that 32 divides (its own 176 does not), for a scale per 32 inputs
GROUPABLE = replace(ModelArgs.from_name("tiny-gqa"), hidden_dim=192)


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / a.float().norm())


@pytest.mark.parametrize("group_size", [None, 32])
def test_int8_keeps_the_tiny_models_logits_and_tokens(group_size):
    ref, q = pair(GROUPABLE, AdapterArgs(adapter_len=4, adapter_layers=3, gate_init="random"), group_size)
    x = torch.randint(0, 256, (4, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = ref(x), q(x)
    assert relative_error(a, b) < 1e-2
    assert (a.argmax(-1) == b.argmax(-1)).float().mean() > 0.95
    prompts = [[1, 5, 9, 200, 7], [1, 42]]
    same = [x == y for x, y in zip(generate(ref, prompts, 8, eos_id=-1), generate(q, prompts, 8, eos_id=-1))]
    assert sum(same) >= 1


@pytest.mark.parametrize("quantized", [False, True], ids=["float", "int8"])
def test_a_decoding_block_reads_its_products_inputs_from_memory(quantized):
    """fuse_projections (the layout inference loads a base in) puts model.written (an op inductor cannot compute
    inside the next product) between SwiGLU and w2 at one row, float or int8: the compiled model's graph calls it
    once a block, not at three rows nor eagerly, and the output is what it was without it. A model laid out for
    training has none. (Written inputs before the other products, tried for int8, did not speed a whole call:
    BENCHMARKS.md, twelfth readings.)"""
    from torch.utils._python_dispatch import TorchDispatchMode

    from llama_adapter.model import written

    adapter = AdapterArgs(adapter_len=4, adapter_layers=2, gate_init="random")
    model = pair(GROUPABLE, adapter)[quantized]
    feed_forwards = [layer.feed_forward for layer in model.layers]
    assert all(ff.write_hidden for ff in feed_forwards)
    assert not any(layer.feed_forward.write_hidden for layer in AdaptedTransformer(GROUPABLE).layers)
    graphs = []

    def backend(gm, _):
        graphs.append(gm)
        return gm

    def calls(gm):
        return sum(n.target in (written, torch.ops.llama_adapter.written.default) for n in gm.graph.nodes)

    class EagerCalls(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.n += func is torch.ops.llama_adapter.written.default
            return func(*args, **(kwargs or {}))

    x = torch.randint(0, GROUPABLE.vocab_size, (1, 1), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = torch.compile(model, backend=backend, fullgraph=True)(x)
        with EagerCalls() as eager:  # eagerly a copy would only cost a kernel
            assert torch.equal(out, model(x))
        assert eager.n == 0
        for ff in feed_forwards:
            ff.write_hidden = False
        assert torch.equal(out, torch.compile(model, backend="eager", fullgraph=True)(x))
        for ff in feed_forwards:
            ff.write_hidden = True
        # more than one row: the products are matrix products, their inputs not copied first
        torch.compile(model, backend=backend, fullgraph=True, dynamic=False)(x.repeat(1, 3))
    [one_row, rows] = graphs
    assert calls(one_row) == GROUPABLE.n_layers
    assert calls(rows) == 0


@pytest.mark.parametrize("quantize", QUANTIZATIONS)
def test_what_int8_quantizes(quantize):
    """The blocks' linear weights, fused ones as one weight with their parts as its rows, with a scale per row or
    per group of inputs as the format says; not the embedding, the output layer, the norms or the adapter (fp32,
    swapped as on any base)."""
    from torchao.quantization import Int8Tensor

    group_size = int8_group_size(quantize)
    _, q = pair(GROUPABLE, AdapterArgs(adapter_len=4, adapter_layers=3), group_size)
    a, f = q.layers[0].attention, q.layers[0].feed_forward
    weights = (a.wqkv, f.w13, a.wq.weight, a.wk.weight, a.wo.weight, f.w1.weight, f.w2.weight)
    assert all(isinstance(t, Int8Tensor) for t in weights)
    for t in weights:  # scales (rows, groups per row)
        assert t.scale.shape == (t.shape[0], 1 if group_size is None else t.shape[1] // group_size)
    assert a.wq.weight.qdata.data_ptr() == a.wqkv.qdata.data_ptr()  # a view: no second copy of the weights
    assert not any(isinstance(t, Int8Tensor) for t in (q.tok_embeddings.weight, q.output.weight,
                                                       q.layers[0].attention_norm.weight))
    assert q.adapter_query.dtype == q.adapter_gate.dtype == torch.float32
    ref, _ = pair(ModelArgs.from_name("tiny-gqa"))
    # what picks the int8 decode step's compilation and names its compile cache, read from the weights themselves
    assert int8_format(q) == quantize and int8_format(ref) is None
    if group_size:  # an attention whose rows are one group wide: the feed-forward's groups still say the format
        narrow = ModelArgs(dim=group_size, n_layers=1, n_heads=4, vocab_size=64, hidden_dim=3 * group_size)
        assert int8_format(pair(narrow, None, group_size)[1]) == quantize


def test_int8_is_for_a_frozen_base_whose_widths_its_groups_divide():
    model = AdaptedTransformer(ModelArgs.from_name("tiny"))
    with pytest.raises(ValueError, match="frozen"):
        quantize_int8(model)
    with pytest.raises(InputError, match=r"--quantize int8-g32: .*input widths \(64, 176\) to be multiples of 32"):
        quantize_int8(model.requires_grad_(False), 32)


def test_int8_leaves_the_process_compile_settings_alone():
    """torchao's int8 config would set inductor's options for the whole process (coordinate-descent tuning over
    all directions for every later compile: a 7B int8 decode step's first compile spent 243 s tuning)."""
    from torch._inductor import config

    def settings():
        return (config.coordinate_descent_tuning, config.coordinate_descent_check_all_directions,
                config.force_fuse_int_mm_with_mul, config.triton.unique_kernel_names)

    before = settings()
    for group_size in (None, 32):
        pair(GROUPABLE, group_size=group_size)
    assert settings() == before


def test_what_fp8_converts():
    """The frozen projections of the blocks; not LoRA's wrapped ones (its update reads their input), the output
    layer, the embedding or the adapter; what trains and the state dict's names stay as they were."""
    from torchao.float8.float8_linear import Float8Linear

    from llama_adapter.config import LoRAArgs
    from llama_adapter.lora import LoRALinear, add_lora
    from llama_adapter.methods import trains

    for method in ("adapter", "lora"):
        model = AdaptedTransformer(ModelArgs.from_name("tiny-gqa"), AdapterArgs(4, 3) if method == "adapter" else None)
        if method == "lora":
            add_lora(model, LoRAArgs())
        for name, p in model.named_parameters():
            p.requires_grad_(trains(method, name))
        before = {k: (v.shape, v.requires_grad) for k, v in model.named_parameters()}
        float8_matmuls(model, torch.device("cpu"))
        a, f = model.layers[0].attention, model.layers[0].feed_forward
        converted = (a.wk, a.wo, f.w1, f.w2, f.w3) if method == "lora" else (a.wq, a.wk, a.wv, a.wo, f.w1, f.w2, f.w3)
        assert all(type(m) is Float8Linear for m in converted)
        if method == "lora":
            assert type(a.wq) is LoRALinear and type(a.wv) is LoRALinear
        assert type(model.output) is torch.nn.Linear
        assert {k: (v.shape, v.requires_grad) for k, v in model.named_parameters()} == before


def test_fp8_weights_cast_once_compute_what_casting_at_every_matmul_does():
    """A frozen weight's float8 scale never changes, so casting it once at load (the default, a base on one device)
    gives the outputs and adapter gradients of casting it at every matmul (a sharded base), bit for bit, while the
    projections keep float8 weights of one byte per element."""
    import copy

    from torchao.float8.float8_linear import Float8Linear
    from torchao.float8.float8_training_tensor import Float8TrainingTensor

    torch.manual_seed(0)
    per_matmul = AdaptedTransformer(ModelArgs.from_name("tiny-gqa"), AdapterArgs(4, 3, gate_init="random"))
    once = copy.deepcopy(per_matmul)
    float8_matmuls(per_matmul, torch.device("cpu"), cast_weights=False)
    float8_matmuls(once, torch.device("cpu"))
    weights = [m.weight for m in once.layers.modules() if type(m) is Float8Linear]
    assert len(weights) == 7 * len(once.layers)
    assert all(isinstance(w, Float8TrainingTensor) and w._data.dtype == torch.float8_e4m3fn for w in weights)
    assert not any(isinstance(m.weight, Float8TrainingTensor) for m in per_matmul.layers.modules()
                   if type(m) is Float8Linear)
    tokens = torch.randint(0, 256, (2, 16))
    results = []
    for model in (per_matmul, once):
        logits = model(tokens)
        logits.float().pow(2).mean().backward()
        results.append((logits.detach(), model.adapter_query.grad, model.adapter_gate.grad))
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_smollm2_int8_reads_real_text_as_full_precision_does(smollm2_gguf):
    import copy

    from llama_adapter.checkpoint import load_base
    from llama_adapter.prompts import chatml_prompt
    from llama_adapter.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(smollm2_gguf)
    text = chatml_prompt("Give three tips for staying healthy.") + (
        "1. Stay hydrated: drink plenty of water every day. 2. Eat a balanced diet with fruits and vegetables. "
        "3. Sleep seven to nine hours a night.")
    x = torch.tensor([tokenizer.encode(text)])
    ref = load_base(smollm2_gguf).eval().requires_grad_(False).fuse_projections()
    with torch.no_grad():
        a = ref(x)
    errors = {}
    for quantize, max_error, min_agreement in [("int8", 8e-2, 0.9), ("int8-g32", 4e-2, 0.98)]:
        q = quantize_int8(copy.deepcopy(ref), int8_group_size(quantize))  # the GGUF read once: ~6 s a read
        with torch.no_grad():
            b = q(x)
        errors[quantize] = relative_error(a, b)
        assert errors[quantize] < max_error
        assert (a.argmax(-1) == b.argmax(-1)).float().mean() >= min_agreement
        [answer] = generate(q, [tokenizer.encode(chatml_prompt("What is the capital of France?"))], 12,
                            tokenizer.eos_id, tokenizer.pad_id)
        assert "Paris" in tokenizer.decode(answer)
    assert errors["int8-g32"] < errors["int8"] / 1.5  # the groups fit SmolLM2's mixed rows better


def test_complete_takes_quantize_int8_from_the_command_line(tmp_path, llama_sp_model):
    from test_cli import run_cli

    from llama_adapter.checkpoint import save_adapter, save_meta_checkpoint

    torch.manual_seed(0)
    model = AdaptedTransformer(ModelArgs(dim=32, n_layers=2, n_heads=2, vocab_size=32000, hidden_dim=64),
                               AdapterArgs(adapter_len=2, adapter_layers=1))
    save_meta_checkpoint(model, tmp_path / "base")
    save_adapter(model, tmp_path / "adapter.safetensors", base_model="random-tiny")
    common = ("complete", "--base", str(tmp_path / "base"), "--adapter", str(tmp_path / "adapter.safetensors"),
              "--tokenizer", str(llama_sp_model), "--prompt", "Name a colour.", "--max-new-tokens", "5")
    for quantize in QUANTIZATIONS:
        proc = run_cli(*common, "--quantize", quantize)
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.strip() and "Failed to load" not in proc.stderr
    proc = run_cli(*common, "--quantize", "int4")
    assert proc.returncode == 2 and "invalid choice: 'int4'" in proc.stderr


def test_the_compiled_int8_step_keeps_its_products_above_one_row():
    """Above one row a bf16 model's int8 product stays a matrix product, which inductor's weight-only int8 pattern
    would rewrite into ATen's `_weight_int8pack_mm` (3-5% of the copy rate on a GPU: 7B int8 at batch 16 decoded
    67 tokens/s with it, 1,090 without). The compiled decode step turns pattern matching off for int8 blocks: no
    rewrite is counted (compiled afresh, not from the FX-graph cache, which would skip the patterns), and the
    greedy tokens are the eager step's."""
    from torch._dynamo.utils import counters

    torch.manual_seed(0)
    model = AdaptedTransformer(GROUPABLE, AdapterArgs(adapter_len=4, adapter_layers=3, gate_init="random")).eval()
    q = quantize_int8(model.requires_grad_(False).fuse_projections().to(torch.bfloat16))
    prompts = [[1, 5, 9, 200, 7], [1, 42], [1, 3, 3]]
    torch._dynamo.reset()
    counters.clear()
    with torch._inductor.config.patch(fx_graph_cache=False):
        compiled = generate(q, prompts, 6, eos_id=-1, compile=True, rows=4)
    assert counters["stats"]["unique_graphs"] >= 1  # the step did compile
    assert counters["inductor"]["woq_matcher_count"] == 0
    assert compiled == generate(q, prompts, 6, eos_id=-1)
