"""Batched decoding with the KV cache: small pure functions over a `Transformer`.

Prompts of different lengths are left-padded so every row's next token sits in the same column. RoPE
scores depend only on position differences, so a shared position index per column gives each row the
same attention as it would have alone; padded keys are masked out.
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
    """tokens (B, P) left-padded with pad_id, and valid (B, P): True on real tokens."""
    P = max(len(p) for p in prompts)
    tokens = torch.full((len(prompts), P), pad_id, dtype=torch.long, device=device)
    valid = torch.zeros((len(prompts), P), dtype=torch.bool, device=device)
    for b, p in enumerate(prompts):
        tokens[b, P - len(p):] = torch.tensor(p, dtype=torch.long, device=device)
        valid[b, P - len(p):] = True
    return tokens, valid


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
    tokens, valid = left_pad(prompts, pad_id, device)
    B, P = tokens.shape
    S = P + max_new_tokens
    key_valid = torch.cat([valid, torch.ones(B, max_new_tokens, dtype=torch.bool, device=device)], dim=1)  # (B, S)
    positions = torch.arange(S, device=device)
    model.setup_kv_cache(B, S)
    try:
        # Prefill. A padded query row would see no key at all (NaN softmax that leaks through the cached
        # values), so every position may always attend to itself.
        causal = positions[None, :] <= positions[:P, None]  # (P, S)
        mask = (causal & key_valid[:, None, :]) | (positions[None, :] == positions[:P, None])
        logits = model(tokens, positions[:P], mask[:, None])[:, -1]
        out = torch.empty(B, max_new_tokens, dtype=torch.long, device=device)
        done = torch.zeros(B, dtype=torch.bool, device=device)
        for t in range(max_new_tokens):
            nxt = sample_next(logits, temperature, top_p, generator)
            out[:, t] = nxt
            done |= nxt == eos_id
            if done.all() or t == max_new_tokens - 1:
                break
            pos = positions[P + t: P + t + 1]
            mask = (key_valid & (positions <= pos))[:, None, None, :]  # (B, 1, 1, S)
            logits = model(nxt[:, None], pos, mask)[:, -1]
    finally:
        model.clear_kv_cache()
    results = []
    for row in out[:, : t + 1].tolist():
        results.append(row[: row.index(eos_id)] if eos_id in row else row)
    return results
