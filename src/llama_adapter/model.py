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

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import AdapterArgs, ModelArgs


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
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return x32.type_as(x) * self.weight


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
        self.kv_cache: KVCache | None = None

    def forward(
        self,
        x: Tensor,
        rope: Tensor,
        input_pos: Tensor,
        mask: Tensor | None,
        adapter: tuple[Tensor, Tensor] | None = None,
    ) -> Tensor:
        B, T, _ = x.shape
        gqa = self.n_heads != self.n_kv_heads
        q = apply_rope(self.wq(x).view(B, T, self.n_heads, self.head_dim), rope).transpose(1, 2)  # (B, nh, T, hs)
        k = apply_rope(self.wk(x).view(B, T, self.n_kv_heads, self.head_dim), rope).transpose(1, 2)  # (B, nkv, T, hs)
        v = self.wv(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        if self.kv_cache is not None:
            k, v = self.kv_cache.update(input_pos, k, v)  # (B, nkv, S, hs)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, enable_gqa=gqa)
        if adapter is not None:
            y = y + self.adapter_attention(q, *adapter)
        return self.wo(y.transpose(1, 2).reshape(B, T, -1))

    def adapter_attention(self, q: Tensor, prompt: Tensor, gate: Tensor) -> Tensor:
        """tanh(gate) · softmax(q Kp^T / sqrt(hs)) Vp over this layer's prompts: (B, nh, T, hs)."""
        B, L = q.size(0), prompt.size(0)
        prompt = prompt.to(q.dtype)
        # The prompts pass through the layer's frozen projections only: no norm, no RoPE (they have no position).
        pk = self.wk(prompt).view(1, L, self.n_kv_heads, self.head_dim).transpose(1, 2).expand(B, -1, -1, -1)
        pv = self.wv(prompt).view(1, L, self.n_kv_heads, self.head_dim).transpose(1, 2).expand(B, -1, -1, -1)
        # A softmax of their own over the L prompt positions, every query sees every prompt (no mask).
        y = F.scaled_dot_product_attention(q, pk, pv, enable_gqa=self.n_heads != self.n_kv_heads)
        return gate.tanh().to(q.dtype).view(1, -1, 1, 1) * y


class FeedForward(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.w1 = nn.Linear(args.dim, args.hidden_dim, bias=False)
        self.w2 = nn.Linear(args.hidden_dim, args.dim, bias=False)
        self.w3 = nn.Linear(args.dim, args.hidden_dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.attention = Attention(args)
        self.feed_forward = FeedForward(args)
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)

    def forward(self, x, rope, input_pos, mask, adapter=None) -> Tensor:
        h = x + self.attention(self.attention_norm(x), rope, input_pos, mask, adapter)
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
        self.set_adapter(adapter)

    def set_adapter(self, adapter: AdapterArgs | None, device: torch.device | str | None = None) -> None:
        """Give the model a fresh adapter of this configuration (or none), replacing any it had. With an
        adapter the base is frozen: only `is_adapter_param` parameters train."""
        for name in ("adapter_query", "adapter_gate"):
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

    def cast_base(self, dtype: torch.dtype) -> Transformer:
        """Cast the frozen base to `dtype`; adapter parameters stay fp32 (use this, not `.to(dtype)`)."""
        for name, p in self.named_parameters():
            if not is_adapter_param(name):
                p.data = p.data.to(dtype)
        return self

    def setup_kv_cache(self, batch: int, max_len: int) -> None:
        w = self.tok_embeddings.weight
        for layer in self.layers:
            a = layer.attention
            a.kv_cache = KVCache(batch, max_len, a.n_kv_heads, a.head_dim, w.dtype, w.device)

    def clear_kv_cache(self) -> None:
        for layer in self.layers:
            layer.attention.kv_cache = None

    def forward(
        self,
        tokens: Tensor,
        input_pos: Tensor | None = None,
        mask: Tensor | None = None,
        positions: Tensor | None = None,
    ) -> Tensor:
        """Logits (B, T, vocab) for tokens (B, T); arguments as for `hidden_states`."""
        return self.output(self.hidden_states(tokens, input_pos, mask, positions))

    def hidden_states(
        self,
        tokens: Tensor,
        input_pos: Tensor | None = None,
        mask: Tensor | None = None,
        positions: Tensor | None = None,
    ) -> Tensor:
        """Final normalised hidden states (B, T, dim) for tokens (B, T). Training projects only the
        positions that carry a loss through `output`, which saves most of the vocabulary matmul.

        input_pos: (T,) the sequence slots of the tokens, default 0..T-1; with a KV cache, where to write.
        mask: boolean (B or 1, 1, T, S), True = may attend; default causal (over the cache when decoding).
        positions: RoPE positions, (T,) or (B, T); default input_pos. They differ from the slots when
        rows are left-padded or samples packed: each sample must count from 0, because the adapter is
        not shift-invariant (RoPE-rotated queries meet position-free prompt keys), unlike attention.
        """
        T = tokens.size(1)
        if input_pos is None:
            input_pos = torch.arange(T, device=tokens.device)
        cache = self.layers[0].attention.kv_cache
        if mask is None and cache is not None:
            mask = torch.arange(cache.k.size(2), device=tokens.device) <= input_pos[:, None]  # (T, S)
        rope = rope_angles(input_pos if positions is None else positions, self.args.head_dim, self.args.rope_theta)
        h = self.tok_embeddings(tokens)  # (B, T, dim)
        first_adapted = self.args.n_layers - (self.adapter.adapter_layers if self.adapter else 0)
        for i, layer in enumerate(self.layers):
            adapter = None
            if i >= first_adapted:
                adapter = (self.adapter_query[i - first_adapted], self.adapter_gate[i - first_adapted])
            h = layer(h, rope, input_pos, mask, adapter)
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
