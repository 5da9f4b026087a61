"""Batched decoding with the KV cache: small pure functions over a `Transformer`.

Prompts of different lengths are left-padded so every row's next token sits in the same column (one KV
cache slot per column); padded keys are masked out. Each row's RoPE positions still count from 0 at its
first real token: plain attention would not care about a shift, but the adapter does (its prompt keys
carry no position while the queries are rotated), so a shared column index would change the output.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .model import Transformer


def sample_next(logits: Tensor, temperature: float, top_p: float, generator: torch.Generator | None) -> Tensor:
    """Next token ids (B,) from last-position logits (B, V): greedy at temperature 0, else nucleus sampling."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    # Keep the smallest prefix whose mass reaches top_p (the first token always survives).
    outside = sorted_probs.cumsum(dim=-1) - sorted_probs > top_p
    sorted_probs = sorted_probs.masked_fill(outside, 0.0)
    choice = torch.multinomial(sorted_probs, 1, generator=generator)  # (B, 1)
    return order.gather(-1, choice).squeeze(-1)


def left_pad(prompts: list[list[int]], pad_id: int, device) -> tuple[Tensor, Tensor]:
    """tokens (B, P) left-padded with pad_id, and the pad count of each row (B,)."""
    P = max(len(p) for p in prompts)
    tokens = torch.full((len(prompts), P), pad_id, dtype=torch.long, device=device)
    for b, p in enumerate(prompts):
        tokens[b, P - len(p):] = torch.tensor(p, dtype=torch.long, device=device)
    return tokens, torch.tensor([P - len(p) for p in prompts], device=device)


@torch.no_grad()
def generate(
    model: Transformer,
    prompts: list[list[int]],
    max_new_tokens: int,
    eos_id: int,
    pad_id: int = 0,
    temperature: float = 0.0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
) -> list[list[int]]:
    """New tokens for each prompt, cut after the first EOS (which is not included)."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token (e.g. BOS)")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    device = model.tok_embeddings.weight.device
    tokens, n_pad = left_pad(prompts, pad_id, device)
    B, P = tokens.shape
    S = P + max_new_tokens
    slots = torch.arange(S, device=device)
    key_valid = slots[None, :] >= n_pad[:, None]  # (B, S)
    rope_pos = (slots[None, :] - n_pad[:, None]).clamp(min=0)  # (B, S): each row counts from its first token
    model.setup_kv_cache(B, S)
    try:
        # Prefill. A padded query row would see no key at all (NaN softmax that leaks through the cached
        # values), so every position may always attend to itself.
        causal = slots[None, :] <= slots[:P, None]  # (P, S)
        mask = (causal & key_valid[:, None, :]) | (slots[None, :] == slots[:P, None])
        logits = model(tokens, slots[:P], mask[:, None], rope_pos[:, :P])[:, -1]
        out = torch.empty(B, max_new_tokens, dtype=torch.long, device=device)
        done = torch.zeros(B, dtype=torch.bool, device=device)
        for t in range(max_new_tokens):
            nxt = sample_next(logits, temperature, top_p, generator)
            out[:, t] = nxt
            done |= nxt == eos_id
            if done.all() or t == max_new_tokens - 1:
                break
            slot = slots[P + t: P + t + 1]
            mask = (key_valid & (slots <= slot))[:, None, None, :]  # (B, 1, 1, S)
            logits = model(nxt[:, None], slot, mask, rope_pos[:, P + t: P + t + 1])[:, -1]
    finally:
        model.clear_kv_cache()
    results = []
    for row in out[:, : t + 1].tolist():
        results.append(row[: row.index(eos_id)] if eos_id in row else row)
    return results
