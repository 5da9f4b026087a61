"""The GPU paths (bf16 base, fp32 adapter, flash/efficient SDPA kernels, KV cache on device).

Skipped without CUDA: CI has no GPU; these run on the lent GPU machine (see docs/VERIFICATION.md)."""

import pytest
import torch

from llama_adapter.config import AdapterArgs, ModelArgs
from llama_adapter.generate import generate
from llama_adapter.model import Transformer, is_adapter_param

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

# Big enough for the fused SDPA kernels (head dim 64), small enough to run in seconds.
ARGS = ModelArgs(dim=512, n_layers=6, n_heads=8, n_kv_heads=2, vocab_size=1024, hidden_dim=1408, max_seq_len=512)
ADAPTER = AdapterArgs(adapter_len=10, adapter_layers=4, gate_init="random")


def models():
    torch.manual_seed(0)
    ref = Transformer(ARGS, ADAPTER).eval()  # fp32 on CPU: the reference
    gpu = Transformer(ARGS, ADAPTER)
    gpu.load_state_dict(ref.state_dict())
    return ref, gpu.cuda().cast_base(torch.bfloat16).eval()


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
    _, gpu = models()
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
