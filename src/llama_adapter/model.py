"""LLaMA in Meta's layout, with LLaMA-Adapter's zero-initialised gated attention.

Parameter names follow Meta's checkpoints (`tok_embeddings`, `layers.N.attention.wq`, `feed_forward.w1`,
`attention_norm`, ...) so a `consolidated.NN.pth` loads with `strict=True`. RoPE uses Meta's interleaved
pair layout; Hugging Face checkpoints are permuted back on load (see checkpoint.py).

The adapter (Zhang et al. 2023, Sec. 3): the model owns one table of adaption prompts, `adapter_query`
(adapter_layers, adapter_len, dim), and one gate per head and adapted layer, `adapter_gate`
(adapter_layers, n_heads). Layer l of the top `adapter_layers` reads its prompts through its own frozen
wk/wv (no norm, no RoPE), gives them a softmax of their own, scales the result by tanh(gate) and adds it
to the ordinary attention output. Gates start at zero, so a fresh adapter leaves the model unchanged.
"""

from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import AdapterArgs, ModelArgs

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


def is_adapter_param(name: str) -> bool:
    """The one predicate that decides what trains and what an adapter file holds."""
    return name.startswith("adapter_")


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
        # The adaption prompts' keys and values (1, nkv, L, hs) do not change while decoding: computed once,
        # they spare every decoded token a second read of wk and wv. So do the batch's image values
        # wv(I) (N+1, nkv, hs) of a multimodal adapter, computed at the prefill.
        self.prompt_kv: tuple[Tensor, Tensor] | None = None
        self.image_values: Tensor | None = None

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

    def forward(
        self,
        x: Tensor,
        rope: Tensor,
        input_pos: Tensor,
        mask: Tensor | None,
        adapter: tuple | None = None,  # (prompt, gate, image or None): see adapter_attention
        cu_seqlens: Tensor | None = None,
        max_seqlen: int = 0,
    ) -> Tensor:
        B, T, _ = x.shape
        if self.wqkv is not None:
            kv = self.n_kv_heads * self.head_dim
            q, k, v = F.linear(x, self.wqkv).split([self.n_heads * self.head_dim, kv, kv], dim=-1)
        else:
            q, k, v = self.wq(x), self.wk(x), self.wv(x)
        q = apply_rope(q.view(B, T, self.n_heads, self.head_dim), rope)  # (B, T, nh, hs)
        k = apply_rope(k.view(B, T, self.n_kv_heads, self.head_dim), rope)  # (B, T, nkv, hs)
        v = v.reshape(B, T, self.n_kv_heads, self.head_dim)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, nh or nkv, T, hs)
        if cu_seqlens is not None:
            flat = [t.transpose(1, 2).flatten(0, 1) for t in (q, k, v)]  # (B*T, nh or nkv, hs)
            y = causal_varlen_attention(*flat, cu_seqlens, max_seqlen)  # (B*T, nh, hs)
            y = y.view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        else:
            if self.kv_cache is not None:
                k, v = self.kv_cache.update(input_pos, k, v)  # (B, nkv, S, hs)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None,
                                               enable_gqa=self.n_heads != self.n_kv_heads)
        if adapter is not None:
            y = y + self.adapter_attention(q, *adapter)
        return self.wo(y.transpose(1, 2).reshape(B, T, -1))

    def prompt_keys_values(self, prompt: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """Keys and values (1, nkv, L, hs) of a layer's prompts (L, dim) through its frozen wk/wv: no norm, no
        RoPE (prompts have no position)."""
        prompt = prompt.to(dtype)
        L = prompt.size(0)
        pk = self.wk(prompt).view(1, L, self.n_kv_heads, self.head_dim).transpose(1, 2)
        pv = self.wv(prompt).view(1, L, self.n_kv_heads, self.head_dim).transpose(1, 2)
        return pk, pv

    def adapter_attention(self, q: Tensor, prompt: Tensor, gate: Tensor,
                          image: tuple[Tensor, Tensor] | None = None) -> Tensor:
        """tanh(gate) · softmax(q Kp^T / sqrt(hs)) Vp over this layer's prompts: (B, nh, T, hs).

        image: (projected image features (N+1, dim), last row zero; the row of each token (B, T), -1 for
        none). The paper adds a token's image to every prompt, P + repeat(I). That shifts every prompt key
        by wk(I), the same for all L prompts, which their softmax cancels; and every prompt value by wv(I),
        which the softmax weights (summing to 1) pass on whole. So the image adds wv(I) to the prompt
        attention's output, exactly, without a prompt tensor per sample in packed batches."""
        cached = self.kv_cache.prompt_kv if self.kv_cache is not None else None
        pk, pv = cached if cached is not None else self.prompt_keys_values(prompt, q.dtype)
        B = q.size(0)
        # A softmax of their own over the L prompt positions, every query sees every prompt (no mask).
        y = F.scaled_dot_product_attention(q, pk.expand(B, -1, -1, -1), pv.expand(B, -1, -1, -1),
                                           enable_gqa=self.n_heads != self.n_kv_heads)
        if image is not None:
            projected, row = image
            iv = self.image_values(projected, q.dtype)[row]  # (B, T, nkv, hs)
            y = y + iv.repeat_interleave(self.n_heads // self.n_kv_heads, dim=2).transpose(1, 2)
        return gate.tanh().to(q.dtype).view(1, -1, 1, 1) * y

    def image_values(self, projected: Tensor, dtype) -> Tensor:
        """wv of each projected image (N+1, nkv, hs); while decoding, those of the prefill are reused."""
        cache = self.kv_cache
        if cache is not None and cache.image_values is not None:
            return cache.image_values
        values = self.wv(projected.to(dtype)).view(-1, self.n_kv_heads, self.head_dim)
        if cache is not None:
            cache.image_values = values
        return values


class FeedForward(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.w1 = nn.Linear(args.dim, args.hidden_dim, bias=False)
        self.w2 = nn.Linear(args.hidden_dim, args.dim, bias=False)
        self.w3 = nn.Linear(args.dim, args.hidden_dim, bias=False)
        self.w13: Tensor | None = None  # set by Transformer.fuse_projections

    def forward(self, x: Tensor) -> Tensor:
        if self.w13 is not None:
            gate, up = F.linear(x, self.w13).chunk(2, dim=-1)
            return self.w2(F.silu(gate) * up)
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.attention = Attention(args)
        self.feed_forward = FeedForward(args)
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)

    def forward(self, x, rope, input_pos, mask, adapter=None, cu_seqlens=None, max_seqlen=0) -> Tensor:
        h = x + self.attention(self.attention_norm(x), rope, input_pos, mask, adapter, cu_seqlens, max_seqlen)
        return h + self.feed_forward(self.ffn_norm(h))


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs, adapter: AdapterArgs | None = None):
        super().__init__()
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(TransformerBlock(args) for _ in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)
        if args.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        self.adapter: AdapterArgs | None = None
        self.lora = None  # LoRAArgs, while lora.add_lora's updates are in the model (not merged)
        self.set_adapter(adapter)

    def set_adapter(self, adapter: AdapterArgs | None, device: torch.device | str | None = None) -> None:
        """Give the model a fresh adapter of this configuration (or none), replacing any it had. With an
        adapter the base is frozen: only `is_adapter_param` parameters train."""
        for name in ("adapter_query", "adapter_gate", "adapter_visual"):
            if hasattr(self, name):
                delattr(self, name)
        self.adapter = adapter
        if adapter is not None:
            adapter.validate_for(self.args)
            self.reset_adapter(device)
        for name, p in self.named_parameters():
            p.requires_grad_(adapter is None or is_adapter_param(name))

    def reset_adapter(self, device: torch.device | str | None = None, generator: torch.Generator | None = None):
        """(Re)create the adapter parameters in fp32, as the paper initialises them.

        Prompts ~ N(0, 1) (the released code's nn.Embedding default), gates zero (or N(0, 1) for the
        random-init ablation). `device` defaults to where the base weights are.
        """
        a = self.adapter
        device = device if device is not None else self.tok_embeddings.weight.device
        query = torch.randn(a.adapter_layers, a.adapter_len, self.args.dim, device=device, generator=generator)
        gate_shape = (a.adapter_layers, self.args.n_heads)
        if a.gate_init == "zero":
            gate = torch.zeros(gate_shape, device=device)
        else:
            gate = torch.randn(gate_shape, device=device, generator=generator)
        self.adapter_query = nn.Parameter(query)  # (adapter_layers, adapter_len, dim)
        self.adapter_gate = nn.Parameter(gate)  # (adapter_layers, n_heads)
        if a.visual_dim:  # image features -> model dim (fp32, PyTorch's default init; the zero gates hide it)
            with torch.device(device):
                self.adapter_visual = nn.Sequential(nn.Linear(a.visual_dim, a.visual_hidden), nn.GELU(),
                                                    nn.Linear(a.visual_hidden, self.args.dim))

    def cast_base(self, dtype: torch.dtype) -> Transformer:
        """Cast the frozen base to `dtype`; adapter parameters stay fp32 (use this, not `.to(dtype)`)."""
        for name, p in self.named_parameters():
            if not is_adapter_param(name):
                p.data = p.data.to(dtype)
        return self

    @torch.no_grad()
    def setup_kv_cache(self, batch: int, max_len: int) -> None:
        """KV caches for decoding, holding the adapter's current prompt keys and values (set it up again
        after changing the adapter)."""
        w = self.tok_embeddings.weight
        for i, layer in enumerate(self.layers):
            a = layer.attention
            a.kv_cache = KVCache(batch, max_len, a.n_kv_heads, a.head_dim, w.dtype, w.device)
            adapted = i - self.first_adapted_layer()
            if adapted >= 0:
                a.kv_cache.prompt_kv = a.prompt_keys_values(self.adapter_query[adapted], w.dtype)

    def fuse_projections(self) -> Transformer:
        """Lay out each block's wq/wk/wv, and w1/w3, as one weight each (the parameters become views into it),
        so the forward runs one larger matmul where it ran three, and two. For decoding: each is then a
        bandwidth-bound matrix-vector product, and larger ones run closer to the copy rate (7B, H100: 1,589
        against 1,507 tokens/s at batch 16). Training does not use it: there it cost 4% and 4 GiB.
        Checkpoint names are unchanged. Only for a frozen base, after its last cast or move (a new copy of
        the parameters would leave the fused weights behind)."""
        if any(p.requires_grad for name, p in self.named_parameters() if not is_adapter_param(name)):
            raise ValueError("fuse_projections is for a frozen base: the fused weights receive no gradient")
        for layer in self.layers:
            a, f = layer.attention, layer.feed_forward
            a.wqkv, f.w13 = fuse_linears([a.wq, a.wk, a.wv]), fuse_linears([f.w1, f.w3])
        return self

    def first_adapted_layer(self) -> int:
        return self.args.n_layers - (self.adapter.adapter_layers if self.adapter else 0)

    def compile_blocks(self, **kwargs) -> Transformer:
        """Compile each transformer block in place (whole-graph: a graph break is an error); the embedding,
        loss and decode loop stay eager. All blocks share the compiled code, one variant per kind of call
        (with or without adapter, gradient into the block or not, training or evaluation). Shapes are
        dynamic from the start: packed batches change length every step, and specialising first would
        spend a recompilation per kind."""
        for layer in self.layers:
            layer.compile(fullgraph=True, **{"dynamic": True, **kwargs})
        return self

    def clear_kv_cache(self) -> None:
        for layer in self.layers:
            layer.attention.kv_cache = None

    def forward(
        self,
        tokens: Tensor,
        input_pos: Tensor | None = None,
        mask: Tensor | None = None,
        positions: Tensor | None = None,
        cu_seqlens: Tensor | None = None,
        max_seqlen: int | None = None,
        image_features: Tensor | None = None,
        image_index: Tensor | None = None,
    ) -> Tensor:
        """Logits (B, T, vocab) for tokens (B, T); arguments as for `hidden_states`."""
        return self.output(self.hidden_states(tokens, input_pos, mask, positions, cu_seqlens, max_seqlen,
                                              image_features, image_index))

    def hidden_states(
        self,
        tokens: Tensor,
        input_pos: Tensor | None = None,
        mask: Tensor | None = None,
        positions: Tensor | None = None,
        cu_seqlens: Tensor | None = None,
        max_seqlen: int | None = None,
        image_features: Tensor | None = None,
        image_index: Tensor | None = None,
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
        image_features: (N, visual_dim) cached features of the batch's images, for a multimodal adapter;
        image_index: (B, T) which of them each token's sample shows, -1 for none (prompts unchanged).
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
        image = None
        if image_features is not None and not (self.adapter and self.adapter.visual_dim):
            raise ValueError("image features were given but the adapter is text-only (visual_dim 0)")
        if image_features is not None:
            projected = self.adapter_visual(image_features.float())  # (N, dim): I_p, one per image
            image = (torch.cat([projected, projected.new_zeros(1, projected.size(1))]), image_index)  # -1: zero row
        first_adapted = self.first_adapted_layer()
        for i, layer in enumerate(self.layers):
            adapter = None
            if i >= first_adapted:
                adapter = (self.adapter_query[i - first_adapted], self.adapter_gate[i - first_adapted], image)
            h = layer(h, rope, input_pos, mask, adapter, cu_seqlens, max_seqlen)
        return self.norm(h)

    def adapter_state_dict(self) -> dict[str, Tensor]:
        return {k: v for k, v in self.state_dict().items() if is_adapter_param(k)}

    def base_state_keys(self) -> dict[str, torch.Size]:
        """Names and shapes a base checkpoint must provide (a tied output shares tok_embeddings)."""
        return {
            k: v.shape
            for k, v in self.state_dict().items()
            if not is_adapter_param(k) and not (self.args.tie_embeddings and k == "output.weight")
        }
