"""The GPU paths (bf16 base, fp32 adapter, flash/efficient SDPA kernels, KV cache on device).

Skipped without CUDA: CI has no GPU; these run on the lent GPU machine (see docs/VERIFICATION.md)."""

import numpy as np
import pytest
import torch

from llama_adapter.adapter import AdaptedTransformer, is_adapter_param
from llama_adapter.config import AdapterArgs, ModelArgs
from llama_adapter.generate import generate
from llama_adapter.model import Transformer

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

# Big enough for the fused SDPA kernels (head dim 64), small enough to run in seconds.
ARGS = ModelArgs(dim=512, n_layers=6, n_heads=8, n_kv_heads=2, vocab_size=1024, hidden_dim=1408, max_seq_len=512)
ADAPTER = AdapterArgs(adapter_len=10, adapter_layers=4, gate_init="random")


@pytest.fixture(autouse=True)
def fresh_compiler():
    """Each test compiles as a job of its own would: dynamo's per-code-object recompile limit (8) is otherwise
    shared by every test's block variants (adapter, LoRA, full, float8 projections...) and reached by the later
    ones, which compile with fullgraph=True and so fail instead of falling back."""
    torch._dynamo.reset()


def models(fused=False):
    """The fp32 CPU reference and the same weights in bf16 on the GPU, fused for decoding as the CLI loads
    them, or not, as training does."""
    torch.manual_seed(0)
    ref = AdaptedTransformer(ARGS, ADAPTER).eval()  # fp32 on CPU: the reference
    gpu = AdaptedTransformer(ARGS, ADAPTER)
    gpu.load_state_dict(ref.state_dict())
    gpu = gpu.cuda().cast_base(torch.bfloat16).eval()
    return ref, gpu.fuse_projections() if fused else gpu


def rel_err(a, b):
    return ((a.float().cpu() - b.float().cpu()).norm() / b.float().cpu().norm()).item()


def test_bf16_forward_backward_trains_only_fp32_adapter():
    ref, gpu = models()
    x = torch.randint(0, ARGS.vocab_size, (4, 256))
    with torch.no_grad():
        assert rel_err(gpu(x.cuda()), ref(x)) < 2e-2
    logits = gpu(x.cuda())
    torch.nn.functional.cross_entropy(logits[:, :-1].float().flatten(0, 1), x[:, 1:].cuda().flatten()).backward()
    for name, p in gpu.named_parameters():
        if is_adapter_param(name):
            assert p.dtype == torch.float32 and p.grad is not None and p.grad.dtype == torch.float32
            assert torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0
        else:
            assert p.dtype == torch.bfloat16 and p.grad is None


def test_kv_cache_decoding_on_gpu():
    _, gpu = models(fused=True)
    x = torch.randint(0, ARGS.vocab_size, (2, 40), device="cuda")
    with torch.no_grad():
        full = gpu(x)
        gpu.setup_kv_cache(2, 64)
        steps = [gpu(x[:, :24], torch.arange(24, device="cuda"))]
        steps += [gpu(x[:, t: t + 1], torch.tensor([t], device="cuda")) for t in range(24, 40)]
        gpu.clear_kv_cache()
    assert rel_err(torch.cat(steps, 1), full) < 2e-2


def test_left_padded_generation_on_gpu():
    """Each greedy token of a left-padded batch is the argmax of the unpadded sequence's own forward pass
    (up to kernel round-off: a random model has near-ties that batch-size-dependent kernels may flip)."""
    ref, _ = models()
    gpu = ref.cuda()
    prompts = [[1, 5, 9, 200, 7], [1, 42], [1, 3, 3, 3, 3, 3, 3, 3, 8]]
    batched = generate(gpu, prompts, max_new_tokens=10, eos_id=2)
    with torch.no_grad():
        for prompt, out in zip(prompts, batched):
            logits = gpu(torch.tensor([prompt + out], device="cuda"))[0, len(prompt) - 1: len(prompt) - 1 + len(out)]
            chosen = logits.gather(-1, torch.tensor(out, device="cuda")[:, None]).squeeze(-1)
            assert (logits.max(-1).values - chosen).max() < 1e-3


def test_training_on_gpu(tmp_path):
    """bf16 base, fp32 adapter and optimizer state, the packed-batch loss on the GPU."""
    from test_train import ARGS as TRAIN_ARGS
    from test_train import config, synthetic_split

    from llama_adapter.checkpoint import read_adapter, save_meta_checkpoint
    from llama_adapter.train import train

    torch.manual_seed(0)
    save_meta_checkpoint(Transformer(TRAIN_ARGS), tmp_path / "base")
    setup = (tmp_path, synthetic_split(tmp_path / "train", 96, 0), synthetic_split(tmp_path / "val", 16, 1))
    result = train(config(setup, tmp_path / "run", device="cuda"))
    losses = [h["loss"] for h in result["history"]]
    assert losses[-1] < 0.7 * losses[0]
    tensors = read_adapter(tmp_path / "run" / "adapter.safetensors")[2]
    assert all(t.dtype == torch.float32 for t in tensors.values())


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize(("method", "lr"), [("lora", 0.05), ("full", 0.01)])
def test_baselines_train_on_gpu(tmp_path, method, lr, compiled):
    """LoRA and full fine-tuning through the GPU's packed path (flash varlen attention, bf16 autocast), eager and
    with the blocks compiled; the trained tensors stay fp32."""
    from test_train import ARGS as TRAIN_ARGS
    from test_train import config, synthetic_split

    from llama_adapter.checkpoint import save_meta_checkpoint
    from llama_adapter.config import WEIGHTS
    from llama_adapter.train import train

    torch.manual_seed(0)
    save_meta_checkpoint(Transformer(TRAIN_ARGS), tmp_path / "base")
    setup = (tmp_path, synthetic_split(tmp_path / "train", 96, 0), synthetic_split(tmp_path / "val", 16, 1))
    result = train(config(setup, tmp_path / "run", device="cuda", method=method, lr=lr, compile=compiled))
    losses = [h["loss"] for h in result["history"]]
    assert losses[-1] < 0.8 * losses[0]
    from safetensors import safe_open

    with safe_open(tmp_path / "run" / WEIGHTS[method], "pt") as f:
        assert all(f.get_tensor(k).dtype == torch.float32 for k in f.keys())


@pytest.mark.skipif(torch.cuda.is_available() and torch.cuda.get_device_capability() < (8, 9),
                    reason="float8 matmuls need compute capability 8.9 (Ada, Hopper)")
def test_fp8_training_on_gpu(tmp_path):
    """--precision fp8 with compiled blocks, as the paper config would run it: the losses follow bf16's (within 5%
    at every step), the adapter trains, and the compiled blocks run float8 matmuls (torch._scaled_mm)."""
    pytest.importorskip("torchao")
    from test_train import ARGS as TRAIN_ARGS
    from test_train import config, synthetic_split

    from llama_adapter.checkpoint import save_meta_checkpoint
    from llama_adapter.train import train

    torch.manual_seed(0)
    save_meta_checkpoint(Transformer(TRAIN_ARGS), tmp_path / "base")
    setup = (tmp_path, synthetic_split(tmp_path / "train", 96, 0), synthetic_split(tmp_path / "val", 16, 1))
    bf16 = train(config(setup, tmp_path / "bf16", device="cuda", compile=True))
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        fp8 = train(config(setup, tmp_path / "fp8", device="cuda", compile=True, precision="fp8"))
    a, b = ([h["loss"] for h in r["history"]] for r in (bf16, fp8))
    assert max(abs(x - y) / x for x, y in zip(a, b)) < 0.05 and b[-1] < 0.7 * b[0]
    kernels = " ".join(e.key.lower() for e in prof.key_averages())
    assert "scaled_mm" in kernels or "f8" in kernels or "e4m3" in kernels, kernels[:2000]


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
@pytest.mark.parametrize(("fsdp", "method", "lr"), [(False, "adapter", None), (True, "adapter", None),
                                                   (True, "lora", 0.05), (True, "full", 0.01)],
                         ids=["replicated", "fsdp", "fsdp-lora", "fsdp-full"])
def test_two_gpus_match_one(tmp_path, fsdp, method, lr):
    """NCCL and the bf16 base: 2 processes (the adapter replicated or over a sharded base; LoRA's and full
    fine-tuning's weights sharded, their mixed fp32/bf16 blocks included) give one GPU's losses."""
    import json
    import subprocess
    import sys

    from test_train import ARGS as TRAIN_ARGS
    from test_train import config, run_cli_train, synthetic_split

    from llama_adapter.checkpoint import save_meta_checkpoint
    from llama_adapter.train import train

    torch.manual_seed(0)
    save_meta_checkpoint(Transformer(TRAIN_ARGS), tmp_path / "base")
    setup = (tmp_path, synthetic_split(tmp_path / "train", 96, 0), synthetic_split(tmp_path / "val", 16, 1))
    kw = {"method": method, "lr": lr, "lora_dropout": 0.0}
    one = train(config(setup, tmp_path / "one", max_steps=4, device="cuda:0", **kw))
    cfg = config(setup, tmp_path / "two", max_steps=4, device=None, **kw)  # each rank takes cuda:LOCAL_RANK
    method_options = ["--method", method, *(["--lora-dropout", "0.0"] if method == "lora" else []),
                      *(["--lr", str(lr)] if lr else [])]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m", "llama_adapter.cli",
           *run_cli_train(cfg, "--max-steps", "4", *method_options, *(["--fsdp"] if fsdp else []))[3:]]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = json.loads((tmp_path / "two" / "metrics.json").read_text())
    assert two["world_size"] == 2
    np.testing.assert_allclose([h["loss"] for h in two["history"]], [h["loss"] for h in one["history"]], rtol=2e-2)


def packed_batch(seed=0, flat=False):
    """Rows of several samples each, lengths not multiples of 16, in the layout training uses; flat: the
    rows laid end to end as one row (the layout training uses with flash varlen attention)."""
    from llama_adapter.batching import collate, pack_rows

    rng = np.random.default_rng(seed)
    lengths = rng.integers(5, 120, 24)
    samples = [(rng.integers(3, ARGS.vocab_size, n), np.arange(n) >= n // 3) for n in lengths]
    rows = [[samples[i] for i in row] for row in pack_rows(lengths, 256)]
    assert len(rows) < len(samples)  # really packed
    return collate([[s for row in rows for s in row]] if flat else rows, pad_id=0).to("cuda")


def loss_and_grads(model, batch):
    from llama_adapter.batching import token_loss_sum

    model.zero_grad(set_to_none=True)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = token_loss_sum(model, batch)
    loss.backward()
    return loss.detach(), model.adapter_query.grad.clone(), model.adapter_gate.grad.clone()


@pytest.mark.parametrize("flat", [False, True], ids=["rows", "flat"])
def test_varlen_flash_attention_equals_the_masked_path(monkeypatch, flat):
    """Packed rows (and the same rows laid end to end) through flash varlen attention give the loss and
    adapter gradients of the dense block-diagonal mask path, within bf16 round-off."""
    from llama_adapter import model as model_module

    assert model_module.varlen_attn is not None, f"torch {torch.__version__} has no varlen attention"
    with torch.autocast("cuda", dtype=torch.bfloat16):  # what training runs under: the flash path is taken
        assert model_module.varlen_usable(torch.zeros(1, device="cuda"))
    _, gpu = models()
    batch = packed_batch(flat=flat)
    flash = loss_and_grads(gpu, batch)
    monkeypatch.setattr(model_module, "varlen_usable", lambda x: False)
    masked = loss_and_grads(gpu, batch)
    for a, b in zip(flash, masked):
        assert rel_err(a, b) < 2e-2


def test_compiled_blocks_equal_eager_on_gpu():
    _, eager = models()
    _, compiled = models()
    compiled.compile_blocks()
    batch = packed_batch(1)
    for a, b in zip(loss_and_grads(compiled, batch), loss_and_grads(eager, batch)):
        assert rel_err(a, b) < 2e-2


def test_cuda_graph_decoding_gives_the_eager_tokens():
    """The CUDA-graph decode step replays the same kernels on the same data: the same greedy tokens."""
    _, gpu = models(fused=True)
    prompts = [[1, 5, 9, 200, 7], [1, 42], [1, 3, 3, 3, 3, 3, 3, 3, 8]]
    graphed = generate(gpu, prompts, max_new_tokens=24, eos_id=-1)
    eager = generate(gpu, prompts, max_new_tokens=24, eos_id=-1, cuda_graph=False)
    assert graphed == eager and all(len(o) == 24 for o in graphed)


@pytest.mark.parametrize("compile", [False, True])
def test_a_kept_cuda_graph_replays_for_the_next_call_of_the_same_shapes(compile):
    """generate(graphs=...) replays the last call's CUDA graph for a call of the same shapes (no capture), with
    this call's prompts and padding: the tokens of a call that captures its own. Gates changed in place (refilled
    prompt values) replay too; another cache length and another adapter capture again."""
    from llama_adapter.generate import CUDAGraphed, DecodeGraphs

    _, gpu = models(fused=True)
    calls = [[[1, 5, 9, 200, 7, 8, 11, 12], [1, 42, 43, 44, 45, 46, 47, 48]], [[1, 5, 9], [1, 3, 3, 3, 3, 3, 8]],
             [[1, 77, 78, 79, 80, 81]]]  # 8, 7 and 6 prompt tokens: one cache length for 16 new tokens

    def decode(rows, n=16, graphs=None):
        return generate(gpu, rows, n, eos_id=-1, rows=2, compile=compile, graphs=graphs)

    expected = [decode(rows) for rows in calls]
    with torch.no_grad():
        gpu.adapter_gate.mul_(-1)
    flipped, longer = decode(calls[1]), decode(calls[1], 40)
    with torch.no_grad():
        gpu.adapter_gate.mul_(-1)
    assert flipped != expected[1]  # the gates matter to these tokens
    captures, replays = [], []
    with DecodeGraphs(gpu) as graphs, pytest.MonkeyPatch.context() as patch:
        patch.setattr(CUDAGraphed, "__init__", lambda self, *a, init=CUDAGraphed.__init__: captures.append(1)
                      or init(self, *a))
        patch.setattr(torch.cuda.CUDAGraph, "replay", lambda self, replay=torch.cuda.CUDAGraph.replay:
                      replays.append(1) or replay(self))
        for rows, tokens in zip(calls, expected):
            assert decode(rows, graphs=graphs) == tokens
        assert len(captures) == 1 and len(replays) == 3 * 15  # one capture served the three calls' 15 steps each
        with torch.no_grad():
            gpu.adapter_gate.mul_(-1)  # in place: replayed, with the prompt values refilled
        assert decode(calls[1], graphs=graphs) == flipped and len(captures) == 1
        assert decode(calls[1], 40, graphs=graphs) == longer and len(captures) == 2  # another cache length
        gpu.set_adapter(AdapterArgs(adapter_len=4, adapter_layers=2, gate_init="random"))  # other tensors
        other = decode(calls[1], graphs=graphs)
        assert len(captures) == 3
    assert other == decode(calls[1])


def test_compiled_decode_step_gives_the_eager_tokens():
    """The compiled decode step (fused kernels, other round-off) picks each token within round-off of the
    eager step's best logit, along the compiled sequence."""
    _, gpu = models(fused=True)
    prompts = [[1, 5, 9, 200, 7], [1, 42]]
    compiled = generate(gpu, prompts, max_new_tokens=12, eos_id=-1, compile=True)
    assert_each_token_near_best(gpu, prompts, compiled)


def assert_each_token_near_best(model, prompts, outs):
    """Each greedy token's logit within round-off (bf16, other kernels) of the best one of the model's own full
    forward pass along the sequence decoded."""
    with torch.no_grad():
        for prompt, out in zip(prompts, outs):
            logits = model(torch.tensor([prompt + out], device="cuda"))[0, len(prompt) - 1: len(prompt) - 1 + len(out)]
            chosen = logits.gather(-1, torch.tensor(out, device="cuda")[:, None]).squeeze(-1)
            assert (logits.max(-1).values - chosen).max() < 5e-2


def test_compiled_decode_step_compiles_once_per_job_on_gpu():
    """A job's batches (1, 3 and 8 prompts, each with its own prompt and cache lengths) filled up to 8 rows share
    one compiled decode step and one compiled prefill (a recompilation is an error; one graph per kind of block,
    plain and adapted, for each), each batch's CUDA graph captured anew; greedy tokens within round-off of the
    eager step's best logit."""
    from torch._dynamo.utils import counters

    counters.clear()
    _, gpu = models(fused=True)
    g = torch.Generator().manual_seed(0)
    for n, longest in [(1, 5), (3, 40), (8, 90)]:
        prompts = [[1] + torch.randint(3, ARGS.vocab_size, (int(torch.randint(1, longest, (1,), generator=g)),),
                                       generator=g).tolist() for _ in range(n)]
        with torch.compiler.set_stance("fail_on_recompile" if n > 1 else "default"):
            compiled = generate(gpu, prompts, max_new_tokens=12, eos_id=-1, compile=True, rows=8)
        assert_each_token_near_best(gpu, prompts, compiled)
    assert counters["stats"]["unique_graphs"] == 4


def test_int8_decoding_on_gpu():
    """--quantize int8 on the GPU: logits near bf16's, and the compiled, graphed int8 decode step picks each token
    within round-off of the int8 model's own best logit."""
    from llama_adapter.quantize import quantize_int8

    _, bf16 = models(fused=True)
    _, int8 = models(fused=True)
    quantize_int8(int8.requires_grad_(False))
    x = torch.randint(0, ARGS.vocab_size, (2, 64), device="cuda")
    with torch.no_grad():
        assert rel_err(int8(x), bf16(x)) < 5e-2
    prompts = [[1, 5, 9, 200, 7], [1, 42]]
    compiled = generate(int8, prompts, max_new_tokens=12, eos_id=-1, compile=True)
    assert_each_token_near_best(int8, prompts, compiled)


def test_a_second_int8_job_reuses_the_first_jobs_tuning(tmp_path):
    """int8 decoding compiles under coordinate-descent tuning, which chooses each kernel's configuration when it
    first runs; a second job on another node (empty local caches, the same compile cache) hits the FX-graph cache
    and tunes nothing again (torch up to 2.11 did, on kernels bundled into that cache: generate.compiled_block)."""
    pytest.importorskip("torchao")
    from test_compile_cache import job

    first = job(tmp_path / "shared", tmp_path / "node1", "cuda", "int8")
    assert first["inductor"].get("coordesc_tuning_bench", 0) > 0
    second = job(tmp_path / "shared", tmp_path / "node2", "cuda", "int8")
    assert second["inductor"].get("fxgraph_cache_hit", 0) >= 1 and not second["inductor"].get("fxgraph_cache_miss")
    assert not second["inductor"].get("coordesc_tuning_bench")
    assert second["tokens"] == first["tokens"]

