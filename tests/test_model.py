"""The model and the adapter against independent references: HF transformers' LlamaForCausalLM and
PEFT's AdaptionPrompt, on tiny random configurations loaded through our own HF loader."""

import pytest
import torch
from hf_reference import TINY, random_hf_llama, tokens
from torch.overrides import TorchFunctionMode

from llama_adapter.adapter import AdaptedTransformer, is_adapter_param
from llama_adapter.checkpoint import load_base, save_adapter
from llama_adapter.config import AdapterArgs, ModelArgs
from llama_adapter.model import Transformer

transformers = pytest.importorskip("transformers")

@pytest.fixture(params=TINY)
def hf_pair(request, tmp_path):
    """A random HF Llama saved as safetensors, and its path (preset name for our side)."""
    args = ModelArgs.from_name(request.param)
    return random_hf_llama(args, tmp_path / "hf", random_norms=True), tmp_path / "hf", args


def test_hf_parity(hf_pair):
    hf, path, args = hf_pair
    ours = load_base(path).eval()
    for field in ("dim", "n_layers", "n_heads", "n_kv_heads", "hidden_dim", "tie_embeddings", "rope_theta"):
        assert getattr(ours.args, field) == getattr(args, field), field
    x = tokens(args)
    with torch.no_grad():
        diff = (ours(x) - hf(x).logits).abs().max().item()
    assert diff < 1e-4


def test_peft_adaption_prompt_parity(hf_pair):
    """With every head's gate equal to g, our adapter is PEFT's AdaptionPrompt with scalar gate tanh(g)."""
    peft = pytest.importorskip("peft")
    hf, path, args = hf_pair
    adapter = AdapterArgs(adapter_len=5, adapter_layers=3)
    ours = load_base(path, adapter).eval()
    peft_model = peft.get_peft_model(
        hf, peft.AdaptionPromptConfig(adapter_len=adapter.adapter_len, adapter_layers=adapter.adapter_layers,
                                      task_type="CAUSAL_LM")
    ).eval()
    adapted = [m for m in peft_model.modules() if type(m).__name__ == "AdaptedAttention"]
    assert len(adapted) == adapter.adapter_layers  # PEFT adapts the top layers, in order
    g = 0.7
    with torch.no_grad():
        ours.adapter_gate.fill_(g)
        for layer, m in enumerate(adapted):
            m.adaption_prompt.copy_(ours.adapter_query[layer][None])
            m.adaption_gate.fill_(torch.tanh(torch.tensor(g)).item())
        x = tokens(args)
        diff = (ours(x) - peft_model(input_ids=x).logits).abs().max().item()
        base = (ours(x) - load_base(path)(x)).abs().max().item()
    assert diff < 1e-4
    assert base > 1e-2  # the adapter really changes the output, so the parity above is not vacuous


def test_zero_gate_adapter_is_bit_identical():
    torch.manual_seed(0)
    args = ModelArgs.from_name("tiny-gqa")
    base = Transformer(args).eval()
    adapted = AdaptedTransformer(args, AdapterArgs(adapter_len=4, adapter_layers=3)).eval()
    adapted.load_state_dict(base.state_dict(), strict=False)
    assert torch.all(adapted.adapter_gate == 0)
    x = tokens(args)
    with torch.no_grad():
        assert torch.equal(base(x), adapted(x))


def test_random_gate_init_changes_output():
    torch.manual_seed(0)
    args = ModelArgs.from_name("tiny")
    m = AdaptedTransformer(args, AdapterArgs(adapter_len=4, adapter_layers=2, gate_init="random"))
    assert m.adapter_gate.abs().min() > 0
    x = tokens(args)
    with torch.no_grad():
        out = m(x)
        m.adapter_gate.zero_()
        assert (out - m(x)).abs().max() > 1e-3


@pytest.mark.parametrize("preset", TINY)
def test_kv_cache_decoding_equals_full_forward(preset):
    torch.manual_seed(0)
    args = ModelArgs.from_name(preset)
    m = AdaptedTransformer(args, AdapterArgs(adapter_len=4, adapter_layers=3, gate_init="random")).eval()
    x = tokens(args, T=12)
    prompt_len = 5
    with torch.no_grad():
        full = m(x)
        m.setup_kv_cache(batch=x.size(0), max_len=16)
        steps = [m(x[:, :prompt_len], torch.arange(prompt_len))]
        for t in range(prompt_len, x.size(1)):
            steps.append(m(x[:, t: t + 1], torch.tensor([t])))
        m.clear_kv_cache()
    assert (torch.cat(steps, dim=1) - full).abs().max() < 1e-4  # fp32 round-off of other reduction orders


def test_blocks_compile_without_graph_breaks():
    """compile_blocks asks for whole-graph compilation, so a graph break in a block is an error. The eager
    backend checks the tracing (the GPU test runs inductor); outputs and adapter gradients are unchanged."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    args = ModelArgs.from_name("tiny-gqa")
    eager = AdaptedTransformer(args, AdapterArgs(adapter_len=4, adapter_layers=3, gate_init="random"))
    compiled = AdaptedTransformer(args, AdapterArgs(adapter_len=4, adapter_layers=3, gate_init="random"))
    compiled.load_state_dict(eager.state_dict())
    compiled.compile_blocks(backend="eager")
    x = tokens(args, T=12)
    for m in (eager, compiled):
        m(x).float().pow(2).mean().backward()
    torch.testing.assert_close(compiled(x), eager(x))
    torch.testing.assert_close(compiled.adapter_query.grad, eager.adapter_query.grad)
    assert all(hasattr(layer, "_compiled_call_impl") and layer._compiled_call_impl for layer in compiled.layers)


def test_kv_cache_holds_the_prompt_keys_and_gated_values():
    """Decoding reads the adapter's prompt keys and gated values, per head, from the cache instead of projecting
    the prompts through wk/wv, repeating them for GQA and scaling them by the gates at every token; the tokens'
    hidden states are those of the model without a cache."""
    torch.manual_seed(0)
    args = ModelArgs.from_name("tiny-gqa")
    m = AdaptedTransformer(args, AdapterArgs(adapter_len=4, adapter_layers=3, gate_init="random")).eval()
    x = tokens(args, T=3)
    with torch.no_grad():
        uncached = m(x)
    m.setup_kv_cache(batch=2, max_len=16)
    cached = [layer.attention.prompt_kv for layer in m.layers]
    assert cached[0] is None and all(c[0].shape == c[1].shape == (1, args.n_heads, 4, args.head_dim)
                                     for c in cached[1:])
    calls = []
    for layer in m.layers:
        layer.attention.wk.register_forward_hook(lambda mod, i, o: calls.append(i[0].shape))

    class Ops(TorchFunctionMode):  # the names of the torch functions the forward calls
        def __torch_function__(self, func, types, args=(), kwargs=None):
            ops.add(getattr(func, "__name__", str(func)))
            return func(*args, **(kwargs or {}))

    ops = set()
    with torch.no_grad(), Ops():
        torch.testing.assert_close(m(x, torch.arange(3)), uncached)
    assert all(shape[-2] == 3 for shape in calls)  # only the tokens went through wk, never the 4 prompts
    assert "scaled_dot_product_attention" in ops and not ops & {"tanh", "repeat_interleave"}
    m.clear_kv_cache()


def test_only_adapter_trains_and_gates_start_at_zero():
    args = ModelArgs.from_name("tiny")
    m = AdaptedTransformer(args, AdapterArgs(adapter_len=3, adapter_layers=2))
    trainable = {n for n, p in m.named_parameters() if p.requires_grad}
    assert trainable == {"adapter_query", "adapter_gate"} == {n for n, _ in m.named_parameters() if is_adapter_param(n)}
    assert m.adapter_query.shape == (2, 3, args.dim) and m.adapter_gate.shape == (2, args.n_heads)
    assert torch.all(m.adapter_gate == 0)
    loss = m(tokens(args)).logsumexp(-1).mean()
    loss.backward()
    assert m.adapter_query.grad is not None and m.adapter_gate.grad.abs().sum() > 0
    assert all(p.grad is None for n, p in m.named_parameters() if not is_adapter_param(n))


def test_trainable_parameters_stay_fp32():
    m = AdaptedTransformer(ModelArgs.from_name("tiny"), AdapterArgs(adapter_len=3, adapter_layers=2))
    m.cast_base(torch.bfloat16)
    for n, p in m.named_parameters():
        assert p.dtype == (torch.float32 if is_adapter_param(n) else torch.bfloat16), n
    out = m(tokens(m.args))
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()


def test_7b_parameter_count_and_adapter_file_size(tmp_path):
    with torch.device("meta"):
        m = AdaptedTransformer(ModelArgs.from_name("7B"), AdapterArgs(adapter_len=10, adapter_layers=30))
    assert m.args.hidden_dim == 11008
    assert sum(p.numel() for p in m.parameters()) - m.adapter_query.numel() - m.adapter_gate.numel() == 6_738_415_616
    assert m.adapter_query.numel() == 1_228_800 and m.adapter_gate.numel() == 960
    assert sum(p.numel() for p in m.parameters() if p.requires_grad) == 1_229_760
    m.reset_adapter(device="cpu")  # only the 1.2M adapter tensors are real; the 6.7B base stays on meta
    save_adapter(m, tmp_path / "adapter.safetensors", base_model="7B")
    size = (tmp_path / "adapter.safetensors").stat().st_size
    assert 1_229_760 * 4 < size <= 4_920_000


@pytest.mark.parametrize("name,hidden", [("13B", 13824), ("33B", 17920), ("65B", 22016), ("Llama-2-70B", 28672),
                                         ("Llama-3-8B", 14336), ("SmolLM2-135M", 1536)])
def test_meta_hidden_size_rule(name, hidden):
    assert ModelArgs.from_name(name).hidden_dim == hidden


def test_adapter_layers_cannot_exceed_model():
    with pytest.raises(ValueError, match="adapter_layers 5 exceeds"):
        AdaptedTransformer(ModelArgs.from_name("tiny"), AdapterArgs(adapter_layers=5))


@pytest.mark.parametrize("name", ["7B", "Llama-2-70B", "Llama-3-8B", "SmolLM2-135M", "tiny-gqa", "tiny-tied"])
def test_parameter_count_formula(name):
    args = ModelArgs.from_name(name)
    with torch.device("meta"):
        model = Transformer(args)
    assert args.parameter_count() == sum(p.numel() for p in model.parameters())


def test_fused_projections_keep_outputs_names_and_loading():
    """fuse_projections changes how the matmuls run, not what the model computes or how it is saved."""
    torch.manual_seed(0)
    args = ModelArgs.from_name("tiny-gqa")
    plain = AdaptedTransformer(args, AdapterArgs(adapter_len=4, adapter_layers=3, gate_init="random")).eval()
    fused = AdaptedTransformer(args, AdapterArgs(adapter_len=4, adapter_layers=3, gate_init="random")).eval()
    fused.load_state_dict(plain.state_dict())
    fused.fuse_projections()
    x = tokens(args, T=12)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), plain(x))
    assert fused.state_dict().keys() == plain.state_dict().keys()
    assert all(torch.equal(v, plain.state_dict()[k]) for k, v in fused.state_dict().items())
    # Loading (strict, Meta names) writes through the views into the fused weights.
    other = AdaptedTransformer(args, AdapterArgs(adapter_len=4, adapter_layers=3, gate_init="random"))
    fused.load_state_dict(other.state_dict(), strict=True)
    a = fused.layers[1].attention
    assert torch.equal(a.wqkv[: a.wq.weight.size(0)], other.layers[1].attention.wq.weight)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), other.eval()(x))
    with pytest.raises(ValueError, match="frozen base"):
        Transformer(args).fuse_projections()


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compile_blocks"])
def test_a_fused_models_trainable_adapter_gets_the_unfused_models_gradients(compiled, request):
    """fuse_projections freezes the base, not the adapter: its gradients pass through every feed-forward after it,
    and so through model.written where compiled (w2's input, written first in a fused model at one row)."""
    torch.manual_seed(0)
    args = ModelArgs.from_name("tiny-gqa")
    plain = AdaptedTransformer(args, AdapterArgs(adapter_len=4, adapter_layers=3, gate_init="random"))
    fused = AdaptedTransformer(args, AdapterArgs(adapter_len=4, adapter_layers=3, gate_init="random"))
    fused.load_state_dict(plain.state_dict())
    fused.fuse_projections()
    assert fused.layers[-1].feed_forward.write_hidden
    if compiled:
        # Blocks share compiled code across models: its fused block's graphs would count against a later test's
        # recompile limit (an error under fullgraph)
        request.addfinalizer(torch._dynamo.reset)
        fused.compile_blocks()
    x = tokens(args, B=1, T=1)  # one row: the only input written first
    for m in (plain, fused):
        m(x).float().logsumexp(-1).mean().backward()
    trained = [name for name, p in plain.named_parameters() if p.requires_grad]
    assert trained == ["adapter_query", "adapter_gate"]
    for name in trained:
        torch.testing.assert_close(fused.get_parameter(name).grad, plain.get_parameter(name).grad)


def multimodal_pair(visual_dim=6):
    """A multimodal model and a text-only one with the same base, prompts and gates."""
    torch.manual_seed(0)
    args = ModelArgs.from_name("tiny-gqa")
    mm = AdaptedTransformer(args, AdapterArgs(adapter_len=4, adapter_layers=3, gate_init="random",
                                              visual_dim=visual_dim, visual_hidden=8)).eval()
    text = AdaptedTransformer(args, AdapterArgs(adapter_len=4, adapter_layers=3, gate_init="random")).eval()
    text.load_state_dict({k: v for k, v in mm.state_dict().items() if not k.startswith("adapter_visual")})
    return args, mm, text


def test_multimodal_adapter_adds_the_image_to_every_prompt():
    """Against the paper's definition computed literally: row b's prompts are P_l + repeat(I_b), with
    I_b = MLP(features_b), in every adapted layer; a row without an image keeps P_l."""
    args, mm, text = multimodal_pair()
    x = tokens(args, B=3, T=9)
    features = torch.randn(2, 6)
    index = torch.tensor([[1] * 9, [-1] * 9, [0] * 9])  # row 0 shows image 1, row 1 none, row 2 image 0
    with torch.no_grad():
        out = mm(x, image_features=features, image_index=index)
        projected = mm.adapter_visual(features)
        for b, image in enumerate([1, None, 0]):
            literal = AdaptedTransformer(args, text.adapter).eval()
            literal.load_state_dict(text.state_dict())
            if image is not None:
                literal.adapter_query += projected[image]  # (layers, L, dim) + (dim,): every prompt, every layer
            torch.testing.assert_close(out[b], literal(x[b: b + 1])[0], rtol=1e-4, atol=1e-4)
        assert (out[0] - text(x[:1])[0]).abs().max() > 1e-3  # the image really changes the output


def test_zero_projection_or_no_image_is_the_text_only_model():
    args, mm, text = multimodal_pair()
    x = tokens(args, B=2, T=7)
    features = torch.randn(2, 6)
    with torch.no_grad():
        torch.testing.assert_close(mm(x, image_features=features, image_index=torch.full((2, 7), -1)), text(x))
        mm.adapter_visual[2].weight.zero_()
        mm.adapter_visual[2].bias.zero_()
        torch.testing.assert_close(mm(x, image_features=features, image_index=torch.zeros(2, 7, dtype=torch.long)),
                                   text(x))
    with pytest.raises(ValueError, match="text-only"):
        text(x, image_features=features, image_index=torch.zeros(2, 7, dtype=torch.long))


def test_multimodal_adapter_file_holds_the_projection(tmp_path):
    from llama_adapter.checkpoint import apply_adapter, read_adapter

    args, mm, _ = multimodal_pair()
    save_adapter(mm, tmp_path / "mm.safetensors", base_model="tiny-gqa")
    adapter, _, tensors = read_adapter(tmp_path / "mm.safetensors")
    assert adapter.visual_dim == 6 and {k for k in tensors if k.startswith("adapter_visual")} == {
        "adapter_visual.0.weight", "adapter_visual.0.bias", "adapter_visual.2.weight", "adapter_visual.2.bias"}
    other = AdaptedTransformer(args)
    other.load_state_dict({k: v for k, v in mm.state_dict().items() if not is_adapter_param(k)}, strict=False)
    apply_adapter(other, tmp_path / "mm.safetensors")
    x, features, index = tokens(args, B=1, T=5), torch.randn(1, 6), torch.zeros(1, 5, dtype=torch.long)
    with torch.no_grad():
        torch.testing.assert_close(other.eval()(x, image_features=features, image_index=index),
                                   mm(x, image_features=features, image_index=index))
    assert {n for n, p in other.named_parameters() if p.requires_grad} == set(tensors)
