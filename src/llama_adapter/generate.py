"""Batched decoding with the KV cache: small pure functions over a `Transformer`.

Prompts of different lengths are left-padded so every row's next token sits in the same column (one KV
cache slot per column); padded keys are masked out. Each row's RoPE positions still count from 0 at its
first real token: plain attention would not care about a shift, but the adapter does (its prompt keys
carry no position while the queries are rotated), so a shared column index would change the output.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from .checkpoint import apply_adapter, peft_files, put_adapter, read_fitting_adapter
from .config import (
    PAPER_SAMPLING,
    AdapterArgs,
    CompileConfig,
    InferenceConfig,
    Sampling,
    TrainConfig,
    is_original_release,
)
from .errors import InputError
from .model import Transformer, plain_tensors
from .prompts import alpaca_prompt
from .quantize import int8_format
from .tokenizer import Tokenizer
from .tracking import in_batches


def sample_next(logits: Tensor, temperature: float, top_p: float, seeds: Tensor | None = None, step: int = 0
                ) -> Tensor:
    """Next token ids (B,) from last-position logits (B, V): greedy at temperature 0, else nucleus sampling, each
    row's draw coming from its seed and the step alone (`seeds` (B,), `seeded_uniform`), so that it is the same in
    any batch."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    # Keep the smallest prefix whose mass reaches top_p (the first token always survives).
    outside = sorted_probs.cumsum(dim=-1) - sorted_probs > top_p
    # An exponential race: token i wins with probability p_i / sum(p) among those kept (argmax of p_i / E_i, E_i
    # exponential), each token's E_i drawn for its own id, so the draw does not hang on the order of near-ties.
    kept = torch.zeros_like(outside).scatter_(-1, order, ~outside)
    exponential = -torch.log1p(-seeded_uniform(seeds, step, probs.size(-1)))
    return (probs / exponential).masked_fill(~kept, -1.0).argmax(dim=-1)


def _wrapping(c: int) -> int:
    """A 64-bit constant as torch's (signed) int64 holds it."""
    return c - (1 << 64) if c >= 1 << 63 else c


def _shifted_right(x: Tensor, bits: int) -> Tensor:
    """x >> bits as unsigned 64-bit (torch shifts int64 arithmetically)."""
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def seeded_uniform(seeds: Tensor, step: int, n: int) -> Tensor:
    """(B, n) uniforms in [0, 1), float64, each a function of its row's seed, the step and its column alone:
    splitmix64's mixer over (seed, step, column), in int64 arithmetic that wraps as unsigned arithmetic does (integer
    operations only, so no device's float rounding enters). The same at any batch size, and no generator's state
    to keep."""
    golden = _wrapping(0x9E3779B97F4A7C15)
    x = (seeds.to(torch.int64)[:, None] * _wrapping(0xD1B54A32D192ED03)
         + _wrapping((step + 1) * 0xAEF17502108EF2D9 % (1 << 64))
         + torch.arange(1, n + 1, device=seeds.device, dtype=torch.int64) * golden)
    x = (x ^ _shifted_right(x, 30)) * _wrapping(0xBF58476D1CE4E5B9)
    x = (x ^ _shifted_right(x, 27)) * _wrapping(0x94D049BB133111EB)
    x = x ^ _shifted_right(x, 31)
    return _shifted_right(x, 11).double() / float(1 << 53)


def left_pad(prompts: list[list[int]], pad_id: int, device, width: int = 1) -> tuple[Tensor, Tensor]:
    """tokens (B, P) left-padded with pad_id, P at least `width`, and the pad count of each row (B,)."""
    P = max(width, *(len(p) for p in prompts))
    tokens = torch.full((len(prompts), P), pad_id, dtype=torch.long, device=device)
    for b, p in enumerate(prompts):
        tokens[b, P - len(p):] = torch.tensor(p, dtype=torch.long, device=device)
    return tokens, torch.tensor([P - len(p) for p in prompts], device=device)


def decode_step(model: Transformer, token: Tensor, slot: Tensor, key_valid: Tensor, rope_pos: Tensor,
                image_features: Tensor | None = None, image_row: Tensor | None = None,
                run_block: Callable | None = None) -> Tensor:
    """Logits (B, V) after feeding token (B, 1) into cache slot `slot` (1,); key_valid and rope_pos (B, S)
    say which slots hold real tokens and each slot's RoPE position; image_row (B,) each row's image in
    image_features, -1 for none; run_block as for `Transformer.hidden_states`. Only tensors in, no host sync:
    the step can be captured as a CUDA graph."""
    slots = torch.arange(key_valid.size(1), device=key_valid.device)
    mask = (key_valid & (slots <= slot))[:, None, None, :]  # (B, 1, 1, S)
    if run_block is not None:
        torch._dynamo.mark_dynamic(mask, 3)  # the cache length, as the cache's (mark_lengths_dynamic)
    index = None if image_row is None else image_row[:, None]
    return model(token, slot, mask, rope_pos.index_select(1, slot), image_features=image_features,
                 image_index=index, run_block=run_block)[:, -1]


def greedy_decode_step(*args: Tensor | Transformer | None, run_block: Callable | None = None) -> Tensor:
    """decode_step's next tokens (B,) at temperature 0: the argmax joins the step's CUDA graph, so greedy
    decoding runs no kernel between two steps but the stop test."""
    return decode_step(*args, run_block=run_block).argmax(dim=-1)


def call_block(block: torch.nn.Module, *args) -> Tensor:
    return block(*args)


@functools.cache
def compiled_block() -> Callable:
    """`call_block` compiled once per process, the one compiled function through which every block of a decode step
    runs (regional compilation): its elementwise ops fused (at batch 1 each of RMSNorm, RoPE and the gates is
    otherwise several tiny kernels, and kernel count, not bandwidth, bounds the step). Dynamo traces one block and
    inductor compiles one graph per kind of block (plain and adapted; bf16 and int8 weights) instead of the whole
    32-layer step: 7B on an H200, the whole step's first compile took 80 s.

    Coordinate-descent tuning. With it, inductor writes a one-row matrix product (batch 1) as a reduction of its
    own, tuned for the weight's shape (torch/_inductor/decomposition.py), where cuBLAS's kernels read a one-row
    product's weight at 71-92% of the copy rate: each of 7B's four products alone on an H100, bf16, cuBLAS against
    the tuned reduction: `wqkv` 92 -> 95%, `wo` 71 -> 83%, `w1`/`w3` 88 -> 100%, `w2` 86 -> 96%; the decode step at
    batch 1 161 -> 181 tokens/s (71 -> 80% of the floor), batch 16 unchanged (BENCHMARKS.md, ninth readings). An
    int8 weight's conversion to bf16 fuses into the reduction; without it every decoded token would first convert
    each int8 weight into a bf16 copy (the uncompiled int8 step was 3.3x slower than bf16). w2's input (SwiGLU's
    output) is written first (model.written), not recomputed inside the reduction for every block of outputs.

    With the tuning, Triton's kernels are not bundled into the FX-graph cache. A job that hits that cache would
    restore the bundled kernels as they were compiled, before the tuning chose their configurations when they
    first ran, and torch 2.11 then tunes them all again (pytorch#172819, fixed by 2.13: 120 s of a warm 7B int8
    job on the H200). Unbundled, the job rebuilds each kernel from its source (Triton's binaries come from
    Triton's cache in the same folder) and finds the configuration the tuning chose beside it.

    No pattern matching. Above one row the int8 product stays a matrix product (torchao's
    `mm(x, int8.to(bf16)) * scale`), which one of inductor's post-grad patterns (its weight-only int8 lowering,
    registered for CUDA as for the CPU) rewrites into ATen's `_weight_int8pack_mm`, a kernel that reads the weight
    at 3-5% of the copy rate: 7B int8 decoded 67 tokens/s at batch 16 with it and 1,090 without (bf16 2,266; batch
    1 214 -> 224; H100, BENCHMARKS.md). Without it, inductor converts the weight and calls cuBLAS. bf16 is
    measured without it too (batch 16: 2,286 against 2,293 tokens/s with it and no tuning).

    The batch size stays static (dynamic=False: a dynamic batch cost batch 16 a fifth, 2,032 -> 1,585 tokens/s,
    on an H100); a job decodes at one batch size instead (`generate`'s rows). Only the cache length, which every
    batch changes, and the adapter's length, which adapters taking turns change, are marked dynamic
    (`mark_lengths_dynamic`)."""
    tuning = {"coordinate_descent_tuning": True, "bundle_triton_into_fx_graph_cache": False, "pattern_matcher": False}
    return torch.compile(call_block, fullgraph=True, dynamic=False, options=tuning)


def prefill_block(block: torch.nn.Module, *args) -> Tensor:
    """`call_block` for the prefill, a function of its own: dynamo counts a function's compiled graphs against one
    recompile limit, which the decode step's and the prefill's would then share."""
    return block(*args)


@functools.cache
def compiled_prefill(int8: bool) -> Callable:
    """The prefill, model(tokens, ...), with its blocks run through `prefill_block` compiled once per process (per
    weight format) for any prompt length. Eager, a 7B prefill dispatches some 2,900 operators (90 a layer), each
    launched by the host while the GPU waits: most of a compiled batch-1 call's fixed cost (23 ms bf16; 40 ms int8,
    whose eager products also convert each int8 weight to bf16 in kernels of their own).

    The prompt length, which each batch's longest prompt sets, is dynamic from the first call, as is the cache
    length (mark_lengths_dynamic); the batch is not (a job's rows). int8: no pattern matching (compiled_block:
    it would pick ATen's slow int8 kernel) and no tuning (above one row the products stay cuBLAS's matrix
    products, after a conversion that inductor fuses)."""
    options = {"pattern_matcher": False} if int8 else {}
    blocks = torch.compile(prefill_block, fullgraph=True, dynamic=False, options=options)

    def run_block(block: torch.nn.Module, h: Tensor, rope: Tensor, input_pos: Tensor, mask: Tensor, *rest):
        # h (B, P, dim), rope (B, P, hs/2, 2), input_pos (P,), mask (B, 1, P, S); maybe: a one-token prompt
        # would specialise (a graph of its own) rather than fail, but generate pads a compiled prefill to P >= 2
        for t, dims in ((h, (1,)), (rope, (1,)), (input_pos, (0,)), (mask, (2, 3))):
            for d in dims:
                torch._dynamo.maybe_mark_dynamic(t, d)
        mark_prompt_length_dynamic((h, rope, input_pos, mask, *rest))
        return blocks(block, h, rope, input_pos, mask, *rest)

    def prefill(model: Transformer, *args, **kwargs) -> Tensor:
        with decoding_dynamo_config():
            return model(*args, **kwargs, run_block=run_block)

    return prefill


def compiled_decode_step(greedy: bool) -> Callable:
    """decode_step (greedy: greedy_decode_step) with its blocks run through `compiled_block()`."""
    fn, blocks = greedy_decode_step if greedy else decode_step, compiled_block()

    def run_block(block: torch.nn.Module, *args):
        mark_prompt_length_dynamic(args)
        return blocks(block, *args)

    def step(*args):
        with decoding_dynamo_config():
            return fn(*args, run_block=run_block)

    return step


# The compiled graphs one process may hold for each of the decode step's and the prefill's block functions (dynamo's
# default: 8): a graph for each kind of block (plain, adapted) at each row count (the batch is static), weight format
# and dtype a process decodes with, an adapter of one prompt specialising.
DECODING_RECOMPILE_LIMIT = 64


def decoding_dynamo_config():
    """dynamo's settings while the decode step's or the prefill's blocks compile, set there only (other compiled
    code, training's blocks, keeps dynamo's own):
    - the KV cache is a module buffer, whose shape dynamo holds static, mark_dynamic or not, unless told otherwise
      (force_parameter_static_shapes);
    - the recompile limit is DECODING_RECOMPILE_LIMIT. Under fullgraph, the limit's 9th graph of a function is an
      error: a Python session that decoded at 5 row counts (2 block kinds each) failed, where each new count should
      only compile again."""
    return torch._dynamo.config.patch(force_parameter_static_shapes=False, recompile_limit=DECODING_RECOMPILE_LIMIT)


class StopTest:
    """Whether every row has ended, as the decode loop asks it after each token. On a GPU the host reads the
    answer one token late: the test's result is copied to pinned memory behind the token's kernels, and read
    after the next step is queued, so the GPU always has a step to run while the host waits (waiting for the
    current token's test instead left the GPU idle for the host's launches at every token). Decoding may then run
    one token past the last row's end, which is dropped as everything after an EOS is."""

    def __init__(self, device: torch.device):
        self.lagged = device.type == "cuda"
        if self.lagged:
            self.host = torch.zeros(2, dtype=torch.bool, pin_memory=True)
            self.events = [torch.cuda.Event(), torch.cuda.Event()]
        self.asked = 0

    def all_done(self, done: Tensor) -> bool:
        """Ask about `done` (B,); answer for it on the CPU, for the previous call's on a GPU (False at first)."""
        if not self.lagged:
            return bool(done.all())
        i = self.asked % 2
        self.host[i].copy_(done.all(), non_blocking=True)
        self.events[i].record()
        self.asked += 1
        if self.asked == 1:
            return False
        self.events[1 - i].synchronize()
        return bool(self.host[1 - i])


def mark_lengths_dynamic(model: Transformer) -> None:
    """Compile the decode step's and the prefill's blocks for any KV cache length and any adapter length.
    - The cache: each batch's longest prompt sets its length, so a block specialised to it would recompile at
      nearly every batch (and fall back to eager after the recompile limit). (The step's mask, made at every step,
      is marked in decode_step.)
    - The adapter's prompts (adapter_len L): each adapter a job takes turns with (generate_requests) would
      otherwise compile an adapted block of its own for the step and for the prefill, and the ninth adapter of
      distinct lengths in a process failed at dynamo's recompile limit (8 graphs a function). Their keys and
      values (1, nh, L, hs) are marked here, the prompts (L, dim) as each block is called (mark_prompt_length_dynamic).
    Attention over a symbolic length loses nothing: its kernels take the length at run time."""
    for layer in model.layers:
        cache = layer.attention.kv_cache  # (B, nkv, S, hs)
        torch._dynamo.mark_dynamic(cache.k, 2)
        torch._dynamo.mark_dynamic(cache.v, 2)
        for t in getattr(layer.attention, "prompt_kv", None) or ():  # maybe: an adapter of one prompt specialises
            torch._dynamo.maybe_mark_dynamic(t, 2)


def mark_prompt_length_dynamic(block_args: tuple) -> None:
    """A block's arguments as Transformer.hidden_states passes them, (h, rope, input_pos, mask, cu_seqlens,
    max_seqlen, *layer_inputs), an adapted block's prompts (L, dim) first among its layer inputs: those dynamic in
    L (mark_lengths_dynamic)."""
    if len(block_args) > 6:
        torch._dynamo.maybe_mark_dynamic(block_args[6], 0)


class CUDAGraphed:
    """A function of fixed-shape tensors captured once as a CUDA graph and replayed: decoding at batch 1 is
    bound by launching ~10 kernels per layer per token, which one graph launch replaces. The returned
    tensor is overwritten by the next call."""

    def __init__(self, fn, *example_inputs: Tensor):
        self.inputs = [x.clone() for x in example_inputs]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up outside the graph: cuBLAS handles, kernel selection
            for _ in range(2):
                fn(*self.inputs)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.output = fn(*self.inputs)

    def __call__(self, *inputs: Tensor) -> Tensor:
        for buffer, x in zip(self.inputs, inputs):
            buffer.copy_(x)
        self.graph.replay()
        return self.output


class DecodeGraphs:
    """The decode step of one `generate` call kept for the next call of the same shapes: the KV caches, the
    adapter's prompt keys and values, the per-call inputs the step reads (which slots hold real tokens, their RoPE
    positions) and, on a GPU, its CUDA graph. Capturing a graph costs each call two warm-up steps and the capture,
    with the GPU idle while the host works; a call of the same rows, cache length and sampling on the same tensors
    replays the kept graph instead. One step is kept at a time (the last call's), only inside the `with` block;
    leaving it, or `release()`, frees it.

    Between calls, and after a call that failed, the kept caches and prompt values are off the model
    (`take_back`), so the model is as without them: a forward, a training step, a change to the adapter or a call
    without `graphs` (or with images, which decodes in caches of its own) sees none of them and leaves them alone.
    A call lends them back (`lend`) only where they fit its cache shape, dtype, device and inference mode;
    otherwise they are freed before its own are allocated, so two sets are never held at once.

    The graph reads fixed addresses: the caches and the prompt keys and values (which setup_kv_cache keeps, zeroes
    and refills in place for caches of the same shape), these inputs, and the weights. A call reuses it only where
    every one of them is where it was, laid out as it was (an adapter put in with other shapes, or weights moved
    or replaced, capture again); their memory is held while the step is kept, so no other tensor can come to lie
    at an address it reads."""

    def __init__(self, model: Transformer):
        self.model: Transformer | None = model
        self.entered = False
        self.release()

    def __enter__(self) -> DecodeGraphs:
        if self.model is None:
            raise ValueError("a DecodeGraphs serves one `with` block; make a new one for the model")
        self.entered = True
        return self

    def __exit__(self, *exc) -> None:
        self.release()
        self.entered, self.model = False, None  # nothing of the model is held once the block is left

    def release(self) -> None:
        """Free the kept step (its caches, prompt values, inputs and graph)."""
        self.key: tuple | None = None
        self.storages: list = []  # of every tensor the kept step reads
        self.inputs: tuple[Tensor, Tensor] | None = None  # key_valid, rope_pos
        self.graph: CUDAGraphed | None = None
        self.state: list[tuple] | None = None  # each layer's (KV cache, prompt keys and values) while off the model
        self.prompt_kv_made = None  # and what those prompt values were computed from (adapter.PromptInputs)

    def lend(self, batch: int, max_len: int) -> None:
        """Put the kept caches and prompt values back on the model for a call of `batch` rows and `max_len`
        positions where they fit it, else free the kept step (before the call allocates its own caches)."""
        if self.state is None:
            return
        cache = self.state[0][0]
        w = self.model.tok_embeddings.weight
        a = self.model.layers[0].attention
        if ((cache.k.shape, cache.k.dtype, cache.k.device, cache.k.is_inference())
                != ((batch, a.n_kv_heads, max_len, a.head_dim), w.dtype, w.device,
                    torch.is_inference_mode_enabled())):
            self.release()
            return
        for layer, (kv_cache, prompt_kv) in zip(self.model.layers, self.state):
            layer.attention.kv_cache = kv_cache
            if prompt_kv is not None:
                layer.attention.prompt_kv = prompt_kv
        if self.prompt_kv_made is not None:
            self.model.prompt_kv_made = self.prompt_kv_made
        self.state = self.prompt_kv_made = None

    def take_back(self) -> None:
        """Take the caches and prompt values off the model after a call, kept for the next; a call that failed
        before its caches were all set up keeps none."""
        if any(layer.attention.kv_cache is None for layer in self.model.layers):
            self.release()
        else:
            self.state = [(layer.attention.kv_cache, getattr(layer.attention, "prompt_kv", None))
                          for layer in self.model.layers]
            self.prompt_kv_made = getattr(self.model, "prompt_kv_made", None)
        self.model.clear_kv_cache()

    def inputs_for(self, key: tuple, tensors: tuple[Tensor, ...], key_valid: Tensor, rope_pos: Tensor
                   ) -> tuple[tuple[Tensor, Tensor], bool]:
        """The step's inputs holding this call's values, and whether the kept step serves this call."""
        if key != self.key:
            self.storages = [t.untyped_storage() for t in tensors]
            self.key, self.inputs, self.graph = key, (key_valid, rope_pos), None
            return self.inputs, False
        for kept, new in zip(self.inputs, (key_valid, rope_pos)):
            kept.copy_(new)
        return self.inputs, True


def step_tensors(model: Transformer) -> tuple[Tensor, ...]:
    """Every tensor a decode step reads: the weights (fused projections too), the KV caches and the adapter's
    prompt keys and values."""
    tensors = [x for p in model.parameters() for x in plain_tensors(p)]
    for layer in model.layers:
        a, f = layer.attention, layer.feed_forward
        for fused in (a.wqkv, f.w13):
            tensors += [] if fused is None else plain_tensors(fused)
        tensors += [a.kv_cache.k, a.kv_cache.v, *(getattr(a, "prompt_kv", None) or ())]
    return tuple(tensors)


# Cache lengths are rounded up to this: the fused attention kernels that take a mask want aligned lengths.
CACHE_MULTIPLE = 16


@torch.no_grad()
def generate(
    model: Transformer,
    prompts: list[list[int]],
    max_new_tokens: int,
    eos_id: int,
    pad_id: int = TrainConfig.pad_id,
    temperature: float = Sampling.temperature,
    top_p: float = Sampling.top_p,
    generator: torch.Generator | None = None,
    cuda_graph: bool = True,
    compile: bool = CompileConfig.compile,
    images: list[np.ndarray | None] | None = None,
    rows: int | None = None,
    graphs: DecodeGraphs | None = None,
    seeds: list[int] | None = None,
) -> list[list[int]]:
    """New tokens for each prompt, cut after the first EOS (which is not included), and where the prompt and its
    answer reach the model's max_seq_len (the positions it knows; the paper's released code decodes no further); a
    prompt that leaves no room for a new token is refused. On a GPU the decode step
    runs as a CUDA graph unless cuda_graph is False (same kernels, so the same tokens). compile: run the
    decode step through torch.compile (a one-off compilation, then faster steps). images: for a multimodal
    adapter, each prompt's image features (None: no image). rows: decode this many rows, the prompts' and
    one-token filler rows whose output is dropped (a compiled step then serves a job's smaller last batch
    without compiling again); default one per prompt. graphs: keep the decode step (its caches and CUDA graph)
    for the next call of the same shapes (DecodeGraphs). seeds: sampling, each prompt's seed, whose draws are its
    own whatever the batch (sample_next); default one per prompt drawn from `generator`."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token (e.g. BOS)")
    limit = model.args.max_seq_len
    if not 1 <= max_new_tokens <= limit:  # (the cache is allocated for them all at once)
        raise ValueError(f"max_new_tokens must be in [1, {limit}] (the model's max_seq_len), got {max_new_tokens}")
    if (k := next((k for k, p in enumerate(prompts) if len(p) >= limit), None)) is not None:
        raise ValueError(f"prompt {k} has {len(prompts[k])} tokens: the model's max_seq_len {limit} leaves no position "
                         f"for a new token; expected prompts of at most {limit - 1} tokens")
    n = len(prompts)
    rows = n if rows is None else rows
    if rows < n:
        raise ValueError(f"rows ({rows}) must be at least the number of prompts ({n})")
    if images is not None and len(images) != n:
        raise ValueError(f"{len(images)} images for {n} prompts")
    if seeds is not None and len(seeds) != n:
        raise ValueError(f"{len(seeds)} seeds for {n} prompts")
    device = model.tok_embeddings.weight.device
    # Compiled, the prefill takes at least two columns: its prompt length is dynamic from 2 (dynamo specialises a
    # length of 1), so a batch of one-token prompts would compile a prefill of its own (compiled_prefill).
    tokens, n_pad = left_pad(prompts + [[pad_id]] * (rows - n), pad_id, device, 2 if compile else 1)
    B, P = tokens.shape
    S = -(-(P + max_new_tokens) // CACHE_MULTIPLE) * CACHE_MULTIPLE
    slots = torch.arange(S, device=device)
    key_valid = slots[None, :] >= n_pad[:, None]  # (B, S)
    rope_pos = (slots[None, :] - n_pad[:, None]).clamp(min=0)  # (B, S): each row counts from its first token
    image_features, image_row = image_inputs(None if images is None else images + [None] * (rows - n), device)
    if graphs is not None and not (graphs.entered and graphs.model is model):
        raise ValueError("graphs: a DecodeGraphs of this model, used inside its `with` block")
    greedy = temperature <= 0
    if not greedy:  # filler rows draw from seed 0: their tokens are dropped
        seeds = draw_seeds(n, generator) if seeds is None else seeds
        row_seeds = torch.tensor(list(seeds) + [0] * (B - n), dtype=torch.int64, device=device)
    keeps, kept = graphs is not None and images is None, False
    try:  # from here on, whatever fails leaves no cache on the model (finally)
        if keeps:
            graphs.lend(B, S)
        model.setup_kv_cache(B, S, keep=keeps)
        if keeps:
            tensors = step_tensors(model)
            autocast = torch.is_autocast_enabled(device.type) and torch.get_autocast_dtype(device.type)
            key = (B, S, greedy, compile, cuda_graph, model.training, autocast, torch.is_inference_mode_enabled(),
                   tuple((t.data_ptr(), t.shape, t.stride(), t.dtype, t.device) for t in tensors))
            (key_valid, rope_pos), kept = graphs.inputs_for(key, tensors, key_valid, rope_pos)
        if compile:
            mark_lengths_dynamic(model)
        # Prefill. A padded query row would see no key at all (NaN softmax that leaks through the cached
        # values), so every position may always attend to itself.
        causal = slots[None, :] <= slots[:P, None]  # (P, S)
        mask = (causal & key_valid[:, None, :]) | (slots[None, :] == slots[:P, None])
        image_index = None if image_row is None else image_row[:, None].expand(B, P)
        if compile and image_index is not None:
            torch._dynamo.maybe_mark_dynamic(image_index, 1)  # the prompt length (compiled_prefill)
        prefill = compiled_prefill(int8_format(model) is not None) if compile else Transformer.__call__
        logits = prefill(model, tokens, slots[:P], mask[:, None], rope_pos[:, :P], image_features=image_features,
                         image_index=image_index)[:, -1]
        out = torch.empty(B, max_new_tokens, dtype=torch.long, device=device)
        done = torch.arange(B, device=device) >= n  # filler rows never hold up the stop
        room = [limit - len(p) for p in prompts]  # each row's new tokens within max_seq_len
        full = torch.tensor(room + [max_new_tokens] * (B - n), device=device)
        step_fn = (compiled_decode_step(greedy) if compile
                   else greedy_decode_step if greedy else decode_step)

        def step(token: Tensor, slot: Tensor) -> Tensor:
            return step_fn(model, token, slot, key_valid, rope_pos, image_features, image_row)

        stop = StopTest(device)
        nxt = sample_next(logits, temperature, top_p, seeds=None if greedy else row_seeds)
        for t in range(max_new_tokens):
            out[:, t] = nxt
            done |= (nxt == eos_id) | (full <= t + 1)
            if t == max_new_tokens - 1 or stop.all_done(done):
                break
            if t == 0 and cuda_graph and device.type == "cuda":
                step = graphs.graph if kept and graphs.graph else CUDAGraphed(step, nxt[:, None], slots[P: P + 1])
                if keeps:
                    graphs.graph = step
            # The next tokens (greedy: the step's own argmax) or the logits to sample them from.
            nxt = step(nxt[:, None], slots[P + t: P + t + 1])
            if not greedy:
                nxt = sample_next(nxt, temperature, top_p, seeds=row_seeds, step=t + 1)
    finally:
        if keeps:
            graphs.take_back()
        else:
            model.clear_kv_cache()
    results = []
    for row, fits in zip(out[:n, : t + 1].tolist(), room):
        row = row[:fits]
        results.append(row[: row.index(eos_id)] if eos_id in row else row)
    return results


def draw_seeds(n: int, generator: torch.Generator | None) -> list[int]:
    """n seeds from `generator` (torch's default one if None), one per prompt, in the prompts' order."""
    device = generator.device if generator is not None else "cpu"
    return torch.randint(0, 1 << 62, (n,), generator=generator, device=device).tolist()


def image_inputs(images: list[np.ndarray | None] | None, device) -> tuple[Tensor | None, Tensor | None]:
    """(features (B, visual_dim) of each row's image, zeros for a row without one; each row's index into them,
    -1 for none), or (None, None) when no row has an image. One feature row per prompt keeps the shapes a
    compiled decode step sees the same from batch to batch, whatever the number of images in each."""
    if images is None or all(i is None for i in images):
        return None, None
    blank = np.zeros_like(next(i for i in images if i is not None))
    features = np.stack([blank if i is None else i for i in images]).astype(np.float32)
    rows = [-1 if i is None else b for b, i in enumerate(images)]
    return torch.from_numpy(features).to(device), torch.tensor(rows, device=device)


PROMPT_KEYS = ("id", "instruction", "input", "prompt", "adapter", "output")
PROMPTS_EXPECTED = ('one JSON object per line with "instruction" (and optionally "input") or "prompt", each a '
                    'string, the instruction or prompt not blank, and optionally "id" (a string or an integer, each '
                    'line its own), "adapter", and "output" (a reference answer, not read)')


# What a request's text must be, by its key: a blank one asks nothing (validate refuses an Alpaca record whose
# instruction is blank, whatever its input: the input is the task's context, not the task).
NON_BLANK = {"instruction": 'a non-blank instruction (the task; an "input" is only its context)',
             "prompt": "a non-blank prompt"}


def check_not_blank(row: dict, source: str) -> None:
    """A request's instruction or raw prompt is not blank (empty or whitespace): InputError naming the request
    (request_name: `source`, its line and id)."""
    key = "prompt" if "prompt" in row else "instruction"
    if not row[key].strip():
        raise InputError(f"{request_name(row, source)}: {key!r} is blank ({row[key]!r}); expected {NON_BLANK[key]}")


def read_prompts(path: Path) -> list[dict]:
    """Requests from a JSONL file: {"id"?, "instruction", "input"?} (Alpaca template) or {"id"?, "prompt"}
    (used as is), each optionally naming an "adapter"; ids default to the line number. Each request keeps its
    1-based line number ("line"), which a later error names (generate_requests). A bad line is an InputError naming
    the file, its line number and what was expected."""
    from .errors import InputError
    from .io import read_jsonl_lines

    rows, lines_of = [], {}
    for n, row in read_jsonl_lines(path, f"a JSONL file of prompts, {PROMPTS_EXPECTED}", InputError):
        if not isinstance(row, dict):
            raise InputError(f"{path}, line {n}: a JSON {type(row).__name__}, not an object; expected "
                             f"{PROMPTS_EXPECTED}")
        if ("prompt" in row) == ("instruction" in row):
            raise InputError(f"{path}, line {n}: keys {sorted(row)} hold "
                             f"{'both' if 'prompt' in row else 'neither'} of 'instruction' and 'prompt'; expected "
                             f"{PROMPTS_EXPECTED}")
        if "prompt" in row and "input" in row:  # a raw prompt is used as it is: the input would be left out of it
            raise InputError(f"{path}, line {n}: 'input' goes with 'instruction' (the Alpaca template), not with "
                             f"'prompt', which is used as it is; expected {PROMPTS_EXPECTED}")
        unknown = sorted(set(row) - set(PROMPT_KEYS))  # a misspelt "input" would be left out of the prompt
        if unknown:
            raise InputError(f"{path}, line {n}: unknown key(s) {unknown}; expected {PROMPTS_EXPECTED}")
        wrong = [k for k in PROMPT_KEYS[1:] if k in row and not isinstance(row[k], str)]
        if wrong:
            raise InputError(f"{path}, line {n}: {', '.join(repr(k) for k in wrong)} must be a string, got "
                             f"{', '.join(type(row[k]).__name__ for k in wrong)}; expected {PROMPTS_EXPECTED}")
        row_id = row.get("id", n)
        if isinstance(row_id, bool) or not isinstance(row_id, str | int):  # (NaN would be written as bare NaN)
            raise InputError(f"{path}, line {n}: id {row_id!r} is a {type(row_id).__name__}; expected "
                             f"{PROMPTS_EXPECTED}")
        if row_id in lines_of:
            raise InputError(f"{path}, line {n}: id {row_id!r} is also line {lines_of[row_id]}'s; expected "
                             f"{PROMPTS_EXPECTED}")
        lines_of[row_id] = n
        rows.append({**row, "id": row_id, "line": n})
        check_not_blank(rows[-1], str(path))
    if not rows:
        raise InputError(f"{path}: holds no prompts; expected {PROMPTS_EXPECTED}")
    return rows


def request_name(row: dict, source: str) -> str:
    """A request as an error names it: its source, its line (one read_prompts read) and its id, where the file gave
    one (an id not given is the line number, not said twice)."""
    line = f", line {row['line']}" if "line" in row else ""
    return f"{source}{line}" + (f" (id {row['id']!r})" if row["id"] != row.get("line") else "")


def prompt_text(row: dict) -> str:
    return row["prompt"] if "prompt" in row else alpaca_prompt(row["instruction"], row.get("input", ""))


def batches_by_length(lengths: list[int], batch_size: int, desc: str) -> Iterator[list[int]]:
    """The indices of `lengths`' items in batches of like length, longest first, with progress (in_batches). A
    batch is padded to its longest item, so batches in the items' own order would compute mostly padding
    (ScienceQA's 4,241 test prompts at batch 32: 1,031,715 tokens with padding in file order, 344,222 sorted,
    333,345 without padding); the longest batch comes first, so one too large for the device fails at once."""
    order = sorted(range(len(lengths)), key=lambda k: -lengths[k])  # stable: equal lengths keep their order
    for i in in_batches(len(order), batch_size, desc):
        yield order[i: i + batch_size]


def prompt_ids(model: Transformer, tokenizer: Tokenizer, prompts: list[str], names: list[str] | None = None
               ) -> list[list[int]]:
    """Each prompt's token ids, BOS first; a prompt that leaves the model no position for a new token is refused,
    named by `names` (where each prompt came from; default: its text alone)."""
    ids = [tokenizer.encode(p, bos=True) for p in prompts]
    limit = model.args.max_seq_len
    if (k := next((k for k, i in enumerate(ids) if len(i) >= limit), None)) is not None:
        raise ValueError(f"{f'{names[k]}: ' if names else ''}prompt {prompts[k][:60]!r}"
                         f"{'...' if len(prompts[k]) > 60 else ''} is {len(ids[k])} tokens (BOS included): the "
                         f"model's max_seq_len {limit} leaves no position for a new token; expected at most "
                         f"{limit - 1} tokens")
    return ids


def complete_texts(
    model: Transformer,
    tokenizer: Tokenizer,
    prompts: list[str],
    sampling: Sampling = Sampling(),
    batch_size: int = InferenceConfig.batch_size,
    generator: torch.Generator | None = None,
    compile: bool = CompileConfig.compile,
    images: list[np.ndarray | None] | None = None,
    rows: int | None = None,
    names: list[str] | None = None,
    ids: list[list[int]] | None = None,
    seeds: list[int] | None = None,
) -> list[str]:
    """The model's continuation of each prompt (BOS prepended), decoded, in batches; images as for generate. The
    draws come from `generator` (sampling's seed is its maker's to use), through a seed per prompt drawn in the
    prompts' order (or given as `seeds`): a prompt's answer does not depend on the batch size, on the prompts
    batched with it or on filler rows. Compiled, every batch decodes `rows` rows
    (default: as many as the first batch has), a smaller one filled up, so that one compilation serves them all.
    A prompt that leaves no position for a new token is refused before any is decoded, named by `names` (where
    each prompt came from; default: its text alone). `ids`: the prompts' token ids where the caller has them
    already from prompt_ids (checked to fit), so as not to tokenize them again. `seeds`: sampling, each prompt's
    seed where the caller drew them (generate_requests: a request's seed is the same under every adapter); then
    `generator` is not drawn from.

    Batches hold prompts of like length (batches_by_length), so that consecutive batches often have the same cache
    length and replay one decode step (DecodeGraphs); the texts come back in the prompts' order."""
    ids = prompt_ids(model, tokenizer, prompts, names) if ids is None else ids
    texts: list[str | None] = [None] * len(ids)
    if seeds is not None and len(seeds) != len(ids):
        raise ValueError(f"{len(seeds)} seeds for {len(ids)} prompts")
    if sampling.temperature <= 0:
        seeds = None
    elif seeds is None:
        seeds = draw_seeds(len(ids), generator)
    rows = (rows or min(batch_size, len(ids))) if compile else None
    with DecodeGraphs(model) as graphs:
        for batch in batches_by_length([len(i) for i in ids], batch_size, "generated"):
            outs = generate(model, [ids[k] for k in batch], sampling.max_new_tokens, tokenizer.eos_id,
                            tokenizer.pad_id, sampling.temperature, sampling.top_p, generator, compile=compile,
                            images=None if images is None else [images[k] for k in batch], rows=rows, graphs=graphs,
                            seeds=None if seeds is None else [seeds[k] for k in batch])
            for k, out in zip(batch, outs):
                texts[k] = tokenizer.decode(out)
    return texts


def decoding_cache(folder: str | None, model: Transformer, rows: int):
    """compile_cache (compile_cache.py) for the decode step of `model` at `rows` rows: generate and evaluate share
    it (the same compiled step). Its kind names what the compiled code depends on: the shapes, the adapter, the
    dtype, device and weights' format, the rows. None: PyTorch's own caches only. One folder per process: inductor's
    compile workers keep the cache folder they started with (compile_cache)."""
    from .compile_cache import compile_cache

    w = model.tok_embeddings.weight
    adapter = getattr(model, "adapter", None)
    # not the adapter's length: the compiled code serves any (mark_lengths_dynamic), so adapters of other lengths
    # share a file (one of length 1, which compiles graphs of its own, adds them to it)
    adapter = adapter and {k: v for k, v in adapter.to_dict().items() if k != "adapter_len"}
    kind = {"command": "decode", "model": model.args.to_dict(), "adapter": adapter,
            "dtype": str(w.dtype), "device": str(w.device), "quantize": int8_format(model), "rows": rows}
    return compile_cache(folder, kind)


def check_requested_adapters(requests: list[dict], adapters: dict[str, Path | None], source: str) -> None:
    """Every adapter a request names (its "adapter" key) is among `adapters` (InputError naming `source`)."""
    unknown = sorted({str(r["adapter"]) for r in requests if "adapter" in r} - set(adapters))
    if unknown:
        raise InputError(f"{source}: requests name adapter(s) {unknown} that were not given; given: "
                         f"{sorted(adapters)}")


def lora_among(adapters: dict[str, Path | None]) -> str | None:
    """The name of the LoRA among `adapters` (apply_adapter's files), if one is. A LoRA is merged into the base's
    weights for good, so it cannot take turns with other adapters: one among others is refused."""
    from .lora import is_lora_file

    lora = [name for name, path in adapters.items() if path is not None and is_lora_file(Path(path))]
    if lora and len(adapters) > 1:
        raise InputError(f"adapter {lora[0]}={adapters[lora[0]]}: a LoRA is merged into the base's weights, so it "
                         "cannot take turns with other adapters; generate with it alone")
    return lora[0] if lora else None


def generate_requests(
    model: Transformer,
    tokenizer: Tokenizer,
    requests: list[dict],
    adapters: dict[str, Path | None],
    sampling: Sampling = PAPER_SAMPLING,
    batch_size: int = InferenceConfig.batch_size,
    compile: bool = CompileConfig.compile,
    out: Path | None = None,
    release: AdapterArgs | None = None,
    compile_cache: str | None = CompileConfig.compile_cache,
    source: str = "requests",
) -> list[dict]:
    """Answer each request with the adapter it names, or with every adapter if it names none. The base is
    loaded once; adapters are swapped in between groups of requests (each file read once, every one checked to
    fit the base before any is used, as is every request's prompt). A None path: the model as it was given (with
    the adapter it held, if any). A LoRA is merged into the weights for good, so it answers alone (refused among
    others), merged here unless the model holds it merged already (load_for_inference merges it before fusing or
    quantizing). The rows come in the requests' order, a request's rows in the adapters' order. With `out`, they are
    also written there as JSON Lines, whole or not at all. `release`: the
    shape of the original-release .pth adapters among them (checkpoint.apply_adapter). Sampling: the paper's by
    default, as the `generate` command's. Compiled, the decode step's compiled code is kept in `compile_cache`
    (decoding_cache). `source`: where the requests came from, which an error names with the request's line (a
    request of read_prompts) and id."""
    check_requested_adapters(requests, adapters, source)
    for request in requests:  # (read_prompts' are: a caller's own may not be)
        check_not_blank(request, source)
    # every request fits the base before any adapter answers; each adapter's turn decodes from these ids
    ids = prompt_ids(model, tokenizer, [prompt_text(r) for r in requests], [request_name(r, source) for r in requests])
    if (lora := lora_among(adapters)) is not None:  # merged for good: it answers every request, applied once
        if getattr(model, "merged_lora", None) != str(peft_files(Path(adapters[lora]))[1]):  # not merged at load
            apply_adapter(model, adapters[lora])
        read = {lora: None}
    else:  # every adapter is read and fits this base before any is used (they are small)
        read = {name: path and read_fitting_adapter(model, Path(path), release if is_original_release(path) else None)
                for name, path in adapters.items()}
        if any(read.values()):  # they go in by turns; a None path answers with the model as it was given
            as_given = (model.adapter, {k: v.detach().clone() for k, v in model.adapter_state_dict().items()})
            read = {name: r or as_given for name, r in read.items()}
            put_adapter(model, *next(iter(read.values())))  # the decode step's cache is named after its shape
    # A request's seed is drawn once, in the requests' order, and serves it under every adapter: an adapter's answer
    # is the same alone as beside others (fresh draws at each adapter's turn made it depend on those before it)
    generator = torch.Generator(model.tok_embeddings.weight.device).manual_seed(sampling.seed)
    seeds = draw_seeds(len(requests), generator) if sampling.temperature > 0 else None
    answers = {}  # (request's index, adapter's index): its row
    rows = min(batch_size, len(requests))  # every adapter's batches, compiled, decode as many rows: one compilation
    with decoding_cache(compile_cache if compile else None, model, rows):
        for a, (name, path) in enumerate(adapters.items()):
            if read[name] is not None:
                put_adapter(model, *read[name])
            mine = [k for k, r in enumerate(requests) if r.get("adapter", name) == name]
            outputs = complete_texts(model, tokenizer, [prompt_text(requests[k]) for k in mine], sampling, batch_size,
                                     compile=compile, rows=rows, ids=[ids[k] for k in mine],
                                     seeds=None if seeds is None else [seeds[k] for k in mine])
            answers |= {(k, a): {"id": requests[k]["id"], "adapter": name, "adapter_path": path and str(path),
                                 "prompt": prompt_text(requests[k]), "output": o, "decoding": sampling.describe()}
                        for k, o in zip(mine, outputs)}
    results = [answers[key] for key in sorted(answers)]  # the requests' order, each one's adapters in theirs
    if out is not None:
        from .io import write_jsonl

        write_jsonl(out, results)
    return results
