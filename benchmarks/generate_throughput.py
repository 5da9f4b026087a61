"""Generation throughput with the adapter on: this library against HF `generate` + PEFT AdaptionPrompt.

A named preset with random bf16 weights (no download), an adapter with non-zero gates (so its branch runs),
prompts of --prompt-len random tokens, greedy decoding of exactly --new-tokens tokens (no EOS can stop it),
at each --batch size; ours eager, with the CUDA-graph decode step, and compiled as well (timed after the
warm-up call, which compiles). Also measures the device's copy bandwidth and prints the memory-bandwidth
floor at batch 1 (every new token reads every weight once): weight bytes / copy rate.

Usage:
    python benchmarks/generate_throughput.py --preset 7B --batch 1 16
Prints one row per implementation and batch size: new tokens/s, and at batch 1 the % of the floor.
"""

from __future__ import annotations

import argparse
import time
from functools import partial

import torch

from llama_adapter.adapter import AdaptedTransformer
from llama_adapter.config import AdapterArgs, ModelArgs
from llama_adapter.generate import generate


def copy_bandwidth(device) -> float:
    """Bytes/s of a large device-to-device copy (read + write counted)."""
    a = torch.empty(2**30, dtype=torch.uint8, device=device)
    b = torch.empty_like(a)
    b.copy_(a)
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(10):
        b.copy_(a)
    torch.cuda.synchronize()
    return 10 * 2 * a.numel() / (time.perf_counter() - t)


def timed(fn) -> float:
    fn()  # warm-up
    torch.cuda.synchronize()
    t = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - t


def ours(args: ModelArgs, adapter: AdapterArgs, prompts: torch.Tensor, new_tokens: int, cuda_graph: bool,
         compile: bool = False) -> float:
    with torch.device("cuda"):
        # as the CLI loads it
        model = AdaptedTransformer(args, adapter).cast_base(torch.bfloat16).eval().fuse_projections()
    with torch.no_grad():
        model.adapter_gate.normal_()
    rows = prompts.tolist()
    seconds = timed(lambda: generate(model, rows, new_tokens, eos_id=-1, cuda_graph=cuda_graph, compile=compile))
    model = None  # frees the weights before the next measurement (the closure above still names it)
    torch.cuda.empty_cache()
    return seconds


def hf_peft(args: ModelArgs, adapter: AdapterArgs, prompts: torch.Tensor, new_tokens: int) -> float:
    from peft import AdaptionPromptConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=args.vocab_size, hidden_size=args.dim, intermediate_size=args.hidden_dim,
                         num_hidden_layers=args.n_layers, num_attention_heads=args.n_heads,
                         num_key_value_heads=args.n_kv_heads, rms_norm_eps=args.norm_eps,
                         max_position_embeddings=4096)
    with torch.device("cuda"):
        model = LlamaForCausalLM(config).to(torch.bfloat16).eval()
    model = get_peft_model(model, AdaptionPromptConfig(adapter_len=adapter.adapter_len,
                                                       adapter_layers=adapter.adapter_layers, task_type="CAUSAL_LM"))
    ids = prompts.cuda()

    def run():
        with torch.no_grad():
            model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                           min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)

    seconds = timed(run)
    model = None  # frees the weights before the next measurement (the closure above still names it)
    torch.cuda.empty_cache()
    return seconds


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="7B")
    p.add_argument("--adapter-len", type=int, default=10)
    p.add_argument("--adapter-layers", type=int, default=30)
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--batch", type=int, nargs="+", default=[1, 16])
    p.add_argument("--no-hf", action="store_true", help="skip the HF + PEFT reference")
    ns = p.parse_args()
    args = ModelArgs.from_name(ns.preset)
    adapter = AdapterArgs(ns.adapter_len, ns.adapter_layers)
    weight_bytes = 2 * args.parameter_count()
    floor = copy_bandwidth("cuda") / weight_bytes
    print(f"{ns.preset}, adapter {ns.adapter_len}x{ns.adapter_layers}, prompt {ns.prompt_len}, {ns.new_tokens} new "
          f"tokens, {torch.cuda.get_device_name()}, torch {torch.__version__}; batch-1 bandwidth floor "
          f"{floor:.0f} tokens/s ({weight_bytes / 1e9:.2f} GB of bf16 weights)")
    print(f"{'implementation':<24}{'batch':>6}{'tokens/s':>10}{'% of floor':>12}")
    impls = {"ours (compiled, graph)": partial(ours, cuda_graph=True, compile=True),
             "ours (CUDA graph)": partial(ours, cuda_graph=True), "ours (eager)": partial(ours, cuda_graph=False)}
    impls |= {} if ns.no_hf else {"HF + PEFT": hf_peft}
    gen = torch.Generator().manual_seed(0)
    for name, fn in impls.items():
        for batch in ns.batch:
            prompts = torch.randint(3, args.vocab_size, (batch, ns.prompt_len), generator=gen)
            rate = batch * ns.new_tokens / fn(args, adapter, prompts, ns.new_tokens)
            share = f"{100 * rate / floor:.0f}" if batch == 1 else ""
            print(f"{name:<24}{batch:>6}{rate:>10.0f}{share:>12}", flush=True)


if __name__ == "__main__":
    main()
