"""LLaMA in Meta's layout, and nothing else: the adapter (adapter.py) and LoRA (lora.py) are changes made to it.

Parameter names follow Meta's checkpoints (`tok_embeddings`, `layers.N.attention.wq`, `feed_forward.w1`,
`attention_norm`, ...) so a `consolidated.NN.pth` loads with `strict=True`. RoPE uses Meta's interleaved
pair layout; Hugging Face checkpoints are permuted back on load (see checkpoint.py).

Two class attributes are the points a variant changes: `TransformerBlock.attention_class` and
`Transformer.block_class`. Per-layer inputs of a variant (`Transformer.layer_inputs`) travel to its attention
after the ordinary arguments.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import ModelArgs

# Flash attention over variable-length segments (torch >= 2.10, CUDA only). Imported only where CUDA is: the
# import pulls in torch's compiler stack, about 2 s that every CPU job (the demo's dozens) would pay for nothing.
varlen_attn, VARLEN_PARAMS = None, frozenset()
if torch.cuda.is_available():
    try:
        from torch.nn.attention.varlen import varlen_attn

        # Its signature changed between releases: read once here, not on every layer's call.
        VARLEN_PARAMS = frozenset(inspect.signature(varlen_attn).parameters)
    except ImportError:
        pass


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        # Normalise in fp32 whatever the activation dtype, as Meta's and HF's implementations do.
        return F.rms_norm(x.float(), x.shape[-1:], eps=self.eps).type_as(x) * self.weight


def rope_angles(positions: Tensor, head_dim: int, theta: float) -> Tensor:
    """cos/sin of RoPE's rotation angles: (*positions.shape, head_dim // 2, 2), fp32.

    Computed per forward from the positions (cheap next to attention) rather than held in a buffer, so a
    bf16 cast of the module cannot degrade it and there is no maximum length to allocate.
    """
    inv_freq = theta ** -(torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim)
    angles = positions.float()[..., None] * inv_freq
    return torch.stack([angles.cos(), angles.sin()], dim=-1)


def apply_rope(x: Tensor, rope: Tensor) -> Tensor:
    """Rotate interleaved pairs (x[2i], x[2i+1]) of x (B, T, nh, hd) by rope (T or B×T, hd/2, 2)."""
    xp = x.float().reshape(*x.shape[:-1], -1, 2)  # (B, T, nh, hd/2, 2)
    rope = rope.view(-1, xp.size(1), 1, xp.size(3), 2)  # (1 or B, T, 1, hd/2, 2)
    cos, sin = rope[..., 0], rope[..., 1]
    out = torch.stack([xp[..., 0] * cos - xp[..., 1] * sin, xp[..., 1] * cos + xp[..., 0] * sin], dim=-1)
    return out.flatten(3).type_as(x)


def causal_varlen_attention(q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, max_len: int) -> Tensor:
    """Causal flash attention within each segment of a flattened token stream: q (N, nh, hs), k, v
    (N, nkv, hs), segment i spanning [cu_seqlens[i], cu_seqlens[i+1]). Packed rows need no dense mask, so
    the flash kernel runs instead of the masked memory-efficient one (measured 2x slower at 7B)."""
    kw = {"is_causal": True} if "is_causal" in VARLEN_PARAMS else {"window_size": (-1, 0)}  # torch 2.10 / 2.11+
    if q.size(1) != k.size(1):
        if "enable_gqa" in VARLEN_PARAMS:
            kw["enable_gqa"] = True
        else:  # query head h reads kv head h // (nh / nkv), as in Meta's repeat_kv
            k, v = (t.repeat_interleave(q.size(1) // k.size(1), dim=1) for t in (k, v))
    return varlen_attn(q, k, v, cu_seqlens, cu_seqlens, max_len, max_len, **kw)


def flash_varlen_on(device: torch.device) -> bool:
    """Whether packed batches on this device can go through flash varlen attention (under bf16 autocast)."""
    return varlen_attn is not None and torch.device(device).type == "cuda"


def varlen_usable(x: Tensor) -> bool:
    """Whether flash varlen attention can take activations like x: CUDA, and fp16/bf16 (or autocast to it)."""
    if varlen_attn is None or not x.is_cuda:
        return False
    dtype = torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else x.dtype
    return dtype in (torch.float16, torch.bfloat16)


def block_causal_mask(cu_seqlens: Tensor, B: int, T: int) -> Tensor:
    """The dense boolean mask (B, 1, T, T) of causal segments given as boundaries in the flattened B*T
    tokens: what the SDPA path needs where flash varlen attention cannot run (CPU, fp32)."""
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    segment = torch.repeat_interleave(torch.arange(len(lengths), device=cu_seqlens.device), lengths).view(B, T)
    causal = torch.ones(T, T, dtype=torch.bool, device=cu_seqlens.device).tril()
    return ((segment[:, :, None] == segment[:, None, :]) & causal)[:, None]


def fuse_linears(linears: list[nn.Linear]) -> Tensor:
    """One weight (sum of outputs, inputs) holding the weights of linears that read the same input; their
    parameters become views into it, so names, state_dict and in-place loading are unchanged."""
    fused = torch.cat([lin.weight.detach() for lin in linears])
    at = 0
    for lin in linears:
        n = lin.weight.size(0)
        lin.weight.data = fused[at: at + n]
        at += n
    return fused


class KVCache(nn.Module):
    """Keys and values of past positions for incremental decoding; allocated only when decoding starts."""

    def __init__(self, batch: int, max_len: int, n_kv_heads: int, head_dim: int, dtype, device):
        super().__init__()
        shape = (batch, n_kv_heads, max_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, input_pos: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        # input_pos: (T,); k, v: (B, n_kv, T, hd)
        self.k[: k.size(0), :, input_pos] = k
        self.v[: v.size(0), :, input_pos] = v
        return self.k[: k.size(0)], self.v[: v.size(0)]


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.n_kv_heads, args.head_dim
        self.wq = nn.Linear(args.dim, args.n_heads * args.head_dim, bias=False)
        self.wk = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=False)
        self.wv = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=False)
        self.wo = nn.Linear(args.n_heads * args.head_dim, args.dim, bias=False)
        self.wqkv: Tensor | None = None  # set by Transformer.fuse_projections
        self.kv_cache: KVCache | None = None

    def forward(self, x: Tensor, rope: Tensor, input_pos: Tensor, mask: Tensor | None,
                cu_seqlens: Tensor | None = None, max_seqlen: int = 0) -> Tensor:
        q, k, v = self.project(x, rope)
        return self.out(self.attend(q, k, v, input_pos, mask, cu_seqlens, max_seqlen))

    def project(self, x: Tensor, rope: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Queries (B, nh, T, hs), keys and values (B, nkv, T, hs) of x (B, T, dim), RoPE applied."""
        B, T, _ = x.shape
        if self.wqkv is not None:
            kv = self.n_kv_heads * self.head_dim
            q, k, v = F.linear(x, self.wqkv).split([self.n_heads * self.head_dim, kv, kv], dim=-1)
        else:
            q, k, v = self.wq(x), self.wk(x), self.wv(x)
        q = apply_rope(q.view(B, T, self.n_heads, self.head_dim), rope)  # (B, T, nh, hs)
        k = apply_rope(k.view(B, T, self.n_kv_heads, self.head_dim), rope)  # (B, T, nkv, hs)
        v = v.reshape(B, T, self.n_kv_heads, self.head_dim)
        return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)

    def attend(self, q: Tensor, k: Tensor, v: Tensor, input_pos: Tensor, mask: Tensor | None,
               cu_seqlens: Tensor | None, max_seqlen: int) -> Tensor:
        """Causal attention (B, nh, T, hs): over packed segments, or over the KV cache while decoding."""
        B, _, T, _ = q.shape
        if cu_seqlens is not None:
            flat = [t.transpose(1, 2).flatten(0, 1) for t in (q, k, v)]  # (B*T, nh or nkv, hs)
            y = causal_varlen_attention(*flat, cu_seqlens, max_seqlen)  # (B*T, nh, hs)
            return y.view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        if self.kv_cache is not None:
            k, v = self.kv_cache.update(input_pos, k, v)  # (B, nkv, S, hs)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None,
                                              enable_gqa=self.n_heads != self.n_kv_heads)

    def out(self, y: Tensor) -> Tensor:
        B, _, T, _ = y.shape
        return self.wo(y.transpose(1, 2).reshape(B, T, -1))  # (B, T, dim)


class FeedForward(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.w1 = nn.Linear(args.dim, args.hidden_dim, bias=False)
        self.w2 = nn.Linear(args.hidden_dim, args.dim, bias=False)
        self.w3 = nn.Linear(args.dim, args.hidden_dim, bias=False)
        self.w13: Tensor | None = None  # set by Transformer.fuse_projections
        self.write_hidden = False  # set by Transformer.fuse_projections (see written)

    def forward(self, x: Tensor) -> Tensor:
        if self.w13 is not None:
            gate, up = F.linear(x, self.w13).chunk(2, dim=-1)
            hidden = F.silu(gate) * up
        else:
            hidden = F.silu(self.w1(x)) * self.w3(x)
        return self.w2(one_row_written(hidden, self.write_hidden))


@torch.library.custom_op("llama_adapter::written", mutates_args=())
def written(x: Tensor) -> Tensor:
    """A copy of x, which inductor cannot see into: what comes after reads x from memory. For w2 at one row, the
    compiled decode step writes the product as a reduction (generate.compiled_block) and would otherwise compute
    SwiGLU inside it, again for every block of the product's outputs, reading both of its inputs each time (the
    compiled int8 step read w2 at half the copy rate, BENCHMARKS.md). Called only where inductor compiles
    (one_row_written)."""
    return x.clone()


@written.register_fake
def _(x: Tensor) -> Tensor:
    return torch.empty_like(x)


# A copy passes its gradient through unchanged: a fused model's trainable adapter (fuse_projections leaves added
# parameters free) still gets gradients through every feed-forward after it, eager or compiled.
written.register_autograd(lambda ctx, grad: grad)


def one_row_written(x: Tensor, write: bool) -> Tensor:
    """x as the next product reads it: where `write`, x is one row and inductor compiles (the compiled decode
    step's products are reductions there), `written(x)`, from memory; otherwise x itself (eagerly the copy would
    only cost a kernel)."""
    return written(x) if write and x.numel() == x.size(-1) and torch.compiler.is_compiling() else x


def plain_tensors(t: Tensor) -> list[Tensor]:
    """The plain tensors behind `t`: a tensor subclass's (torchao's int8 values, scales and zero points), else t."""
    if type(t) in (Tensor, nn.Parameter) or not hasattr(t, "__tensor_flatten__"):
        return [t]
    names, _ = t.__tensor_flatten__()
    return [x for name in names for x in plain_tensors(getattr(t, name))]


class TransformerBlock(nn.Module):
    attention_class = Attention

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.attention = self.attention_class(args)
        self.feed_forward = FeedForward(args)
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)

    def forward(self, x, rope, input_pos, mask, cu_seqlens=None, max_seqlen=0, *extra) -> Tensor:
        # extra: this layer's inputs from Transformer.layer_inputs, for the attention of a variant
        h = x + self.attention(self.attention_norm(x), rope, input_pos, mask, cu_seqlens, max_seqlen, *extra)
        return h + self.feed_forward(self.ffn_norm(h))


class Transformer(nn.Module):
    block_class = TransformerBlock

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(self.block_class(args) for _ in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)
        if args.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight

    def is_added_param(self, name: str) -> bool:
        """Whether a parameter is one a variant adds to LLaMA (adapter.py's prompts): not in a base checkpoint,
        kept in fp32 by `cast_base`. LLaMA itself adds none."""
        return False

    def cast_base(self, dtype: torch.dtype) -> Transformer:
        """Cast the base to `dtype`; added parameters (an adapter's) stay fp32 (use this, not `.to(dtype)`)."""
        for name, p in self.named_parameters():
            if not self.is_added_param(name):
                p.data = p.data.to(dtype)
        return self

    @torch.no_grad()
    def setup_kv_cache(self, batch: int, max_len: int, keep: bool = False) -> None:
        """KV caches for decoding `batch` rows of up to `max_len` positions. keep: caches of that shape already
        there stay, zeroed in place, so that a captured decode step that reads them stays valid
        (generate.DecodeGraphs); zeroed as a fresh cache is, for a masked slot still enters attention as 0 * value,
        and a NaN or inf left by the last call would come through."""
        w = self.tok_embeddings.weight
        for layer in self.layers:
            a = layer.attention
            shape = (batch, a.n_kv_heads, max_len, a.head_dim)
            kept = a.kv_cache
            if keep and kept is not None and (kept.k.shape, kept.k.dtype, kept.k.device) == (shape, w.dtype, w.device):
                kept.k.zero_()
                kept.v.zero_()
            else:
                a.kv_cache = KVCache(batch, max_len, a.n_kv_heads, a.head_dim, w.dtype, w.device)

    def fuse_projections(self) -> Transformer:
        """Lay out each block's wq/wk/wv, and w1/w3, as one weight each (the parameters become views into it),
        so the forward runs one larger matmul where it ran three, and two. For decoding: each is then a
        bandwidth-bound matrix-vector product, and larger ones run closer to the copy rate (7B, H100: 1,589
        against 1,507 tokens/s at batch 16). Training does not use it: there it cost 4% and 4 GiB. w2's input
        is written before its product (`written`), which the compiled decode step computes as a reduction.
        Checkpoint names are unchanged. Only for a frozen base, after its last cast or move (a new copy of the
        parameters would leave the fused weights behind)."""
        if any(p.requires_grad for name, p in self.named_parameters() if not self.is_added_param(name)):
            raise ValueError("fuse_projections is for a frozen base: the fused weights receive no gradient")
        for layer in self.layers:
            a, f = layer.attention, layer.feed_forward
            a.wqkv, f.w13 = fuse_linears([a.wq, a.wk, a.wv]), fuse_linears([f.w1, f.w3])
            f.write_hidden = True  # w2's input read from memory, not recomputed in its product (written)
        return self

    def compile_blocks(self, **kwargs) -> Transformer:
        """Compile each transformer block in place (whole-graph: a graph break is an error); the embedding,
        loss and decode loop stay eager. All blocks share the compiled code, one variant per kind of call
        (with or without a variant's layer inputs, gradient into the block or not, training or evaluation). Shapes are
        dynamic from the start: packed batches change length every step, and specialising first would
        spend a recompilation per kind."""
        for layer in self.layers:
            layer.compile(fullgraph=True, **{"dynamic": True, **kwargs})
        return self

    def clear_kv_cache(self) -> None:
        for layer in self.layers:
            layer.attention.kv_cache = None

    def forward(self, tokens: Tensor, *args, **kwargs) -> Tensor:
        """Logits (B, T, vocab) for tokens (B, T); every other argument as for `hidden_states`."""
        return self.output(self.hidden_states(tokens, *args, **kwargs))

    def hidden_states(
        self,
        tokens: Tensor,
        input_pos: Tensor | None = None,
        mask: Tensor | None = None,
        positions: Tensor | None = None,
        cu_seqlens: Tensor | None = None,
        max_seqlen: int | None = None,
        run_block: Callable | None = None,
        **inputs,
    ) -> Tensor:
        """Final normalised hidden states (B, T, dim) for tokens (B, T). Training projects only the
        positions that carry a loss through `output`, which saves most of the vocabulary matmul.

        input_pos: (T,) the sequence slots of the tokens, default 0..T-1; with a KV cache, where to write.
        mask: boolean (B or 1, 1, T, S), True = may attend; default causal (over the cache when decoding).
        positions: RoPE positions, (T,) or (B, T); default input_pos. They differ from the slots when
        rows are left-padded or samples packed: each sample must count from 0, because the adapter is
        not shift-invariant (RoPE-rotated queries meet position-free prompt keys), unlike attention.
        cu_seqlens: (N+1,) int32 boundaries of independent causal segments in the flattened B*T tokens
        (packed samples), instead of a mask: flash varlen attention where it runs (CUDA, bf16/fp16), else the
        equivalent dense mask. max_seqlen: the longest segment (read from cu_seqlens if not given, a host
        sync); the flash kernel sizes its grid by it, so the row length would launch mostly idle blocks.
        run_block: how each block is called, run_block(block, h, ...) (generate's compiled decode step passes
        one compiled function that every block shares); default the block itself.
        inputs: a variant's own (adapter.py: a multimodal adapter's image_features and image_index).
        """
        T = tokens.size(1)
        if input_pos is None:
            input_pos = torch.arange(T, device=tokens.device)
        cache = self.layers[0].attention.kv_cache
        if mask is None and cache is not None:
            mask = torch.arange(cache.k.size(2), device=tokens.device) <= input_pos[:, None]  # (T, S)
        rope = rope_angles(input_pos if positions is None else positions, self.args.head_dim, self.args.rope_theta)
        h = self.tok_embeddings(tokens)  # (B, T, dim)
        if cu_seqlens is not None and not varlen_usable(h):
            mask, cu_seqlens = block_causal_mask(cu_seqlens, *tokens.shape), None
        if cu_seqlens is not None and max_seqlen is None:
            max_seqlen = int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
        for layer, extra in zip(self.layers, self.layer_inputs(**inputs)):
            args = (h, rope, input_pos, mask, cu_seqlens, max_seqlen, *extra)
            h = layer(*args) if run_block is None else run_block(layer, *args)
        return self.norm(h)

    def layer_inputs(self, **inputs) -> list[tuple]:
        """What each layer's attention takes besides the ordinary arguments: nothing, for LLaMA."""
        given = sorted(k for k, v in inputs.items() if v is not None)
        if given:
            raise ValueError(f"{', '.join(given)} given, but this model reads none (a plain LLaMA: no adapter)")
        return [()] * len(self.layers)

    def base_state_keys(self) -> dict[str, torch.Size]:
        """Names and shapes a base checkpoint must provide (a tied output shares tok_embeddings)."""
        return {
            k: v.shape
            for k, v in self.state_dict().items()
            if not self.is_added_param(k) and not (self.args.tie_embeddings and k == "output.weight")
        }
