"""Batches without padding waste: samples packed into rows, attention kept inside each sample.

A row holds several samples back to back; each sample's positions restart at 0 (the adapter is not
shift-invariant, see model.py) and a block-diagonal causal mask stops attention across samples. The
loss is the sum of next-token cross-entropies over target tokens, so it equals the per-sample
computation whatever the packing; the caller divides by the global number of target tokens.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from .model import flash_varlen_on


def pack_rows(lengths: np.ndarray, row_len: int) -> list[list[int]]:
    """Indices of samples per row, first-fit decreasing: few rows, little padding, deterministic."""
    order = sorted(range(len(lengths)), key=lambda i: (-int(lengths[i]), i))
    rows: list[list[int]] = []
    free: list[int] = []
    for i in order:
        n = int(lengths[i])
        if n > row_len:
            raise ValueError(f"sample {i} has {n} tokens, more than the row length {row_len}")
        for r, space in enumerate(free):
            if n <= space:
                rows[r].append(i)
                free[r] -= n
                break
        else:
            rows.append([i])
            free.append(row_len - n)
    return rows


@dataclass
class Batch:
    tokens: Tensor  # (B, T) int64
    targets: Tensor  # (B, T) next token at each position
    target_mask: Tensor  # (B, T) bool: position t's prediction counts in the loss
    positions: Tensor  # (B, T) RoPE positions, restarting per sample
    cu_seqlens: Tensor  # (N+1,) int32: boundaries of the samples (and padding tails) in the flattened B*T tokens
    max_seqlen: int  # the longest of those segments
    real_tokens: int
    padded_tokens: int
    image_features: Tensor | None = None  # (N, visual_dim) the images of the batch's samples that have one
    image_index: Tensor | None = None  # (B, T) each token's row in image_features, -1: no image

    def to(self, device) -> Batch:
        tensors = {k: None if getattr(self, k) is None else getattr(self, k).to(device, non_blocking=True)
                   for k in ("tokens", "targets", "target_mask", "positions", "cu_seqlens", "image_features",
                             "image_index")}
        return Batch(**tensors, max_seqlen=self.max_seqlen, real_tokens=self.real_tokens,
                     padded_tokens=self.padded_tokens)


# Rows are padded to a multiple of this: the fused attention kernels that take a mask need aligned
# lengths, and fall back to the slow unfused path otherwise (measured 3x slower at 7B on an H100).
ROW_MULTIPLE = 16


def collate(samples: list[list[tuple]], pad_id: int, width: int | None = None) -> Batch:
    """One Batch from rows of (tokens, loss_mask) samples, or (tokens, loss_mask, image features or None);
    rows padded to `width`, by default to the longest row rounded up to a multiple of ROW_MULTIPLE."""
    longest = max(sum(len(s[0]) for s in row) for row in samples)
    T = width or -(-longest // ROW_MULTIPLE) * ROW_MULTIPLE
    if longest > T:
        raise ValueError(f"a row of {longest} tokens does not fit the width {T}")
    B = len(samples)
    tokens = np.full((B, T), pad_id, dtype=np.int64)
    loss_mask = np.zeros((B, T), dtype=bool)
    positions = np.zeros((B, T), dtype=np.int64)
    segment = np.full((B, T), -1, dtype=np.int64)  # -1: padding
    bounds = [0]  # in the flattened B*T tokens; a row's padding tail is a segment of its own
    image_index = np.full((B, T), -1, dtype=np.int64)
    images = []
    for b, row in enumerate(samples):
        at = 0
        for s, (t, m, *image) in enumerate(row):
            n = len(t)
            tokens[b, at: at + n], loss_mask[b, at: at + n] = t, m
            positions[b, at: at + n], segment[b, at: at + n] = np.arange(n), s
            if image and image[0] is not None:
                image_index[b, at: at + n] = len(images)
                images.append(image[0])
            at += n
            bounds.append(b * T + at)
        if at < T:
            bounds.append((b + 1) * T)
    tokens_t, segment_t = torch.from_numpy(tokens), torch.from_numpy(segment)
    targets = torch.zeros_like(tokens_t)
    targets[:, :-1] = tokens_t[:, 1:]
    target_mask = torch.zeros((B, T), dtype=torch.bool)
    # Position t predicts token t+1, which must be a target of the same sample.
    target_mask[:, :-1] = torch.from_numpy(loss_mask[:, 1:]) & (segment_t[:, 1:] == segment_t[:, :-1])
    real = int((segment >= 0).sum())
    batch = Batch(tokens_t, targets, target_mask, torch.from_numpy(positions), torch.tensor(bounds, dtype=torch.int32),
                  int(np.diff(bounds).max()), real, B * T - real)
    if images:
        batch.image_features = torch.from_numpy(np.stack(images).astype(np.float32))
        batch.image_index = torch.from_numpy(image_index)
    return batch


def hidden_states(model, batch: Batch) -> Tensor:
    """The model's final hidden states (B, T, dim) over a batch, each sample attending only to itself."""
    return model.hidden_states(batch.tokens, positions=batch.positions, cu_seqlens=batch.cu_seqlens,
                               max_seqlen=batch.max_seqlen, image_features=batch.image_features,
                               image_index=batch.image_index)


def token_loss_sum(model, batch: Batch) -> Tensor:
    """Sum of next-token cross-entropies over the batch's target tokens (fp32). Only the target positions
    go through the output projection."""
    return target_losses(model, batch, "sum")


def target_losses(model, batch: Batch, reduction: str = "none") -> Tensor:
    """Next-token cross-entropies (fp32) of the batch's target tokens, in the batch's row-major order; summed with
    reduction "sum"."""
    h = hidden_states(model, batch)
    logits = model.output(h[batch.target_mask])  # (n_targets, vocab)
    return torch.nn.functional.cross_entropy(logits.float(), batch.targets[batch.target_mask], reduction=reduction)


def packed_batches(ds, idx: np.ndarray, row_len: int, rows_per_batch: int, pad_id: int, flat: bool = False):
    """Batches of packed rows over samples `idx` of a TokenDataset, in a deterministic order, each with its samples'
    positions in `idx` in the batch's row-major order: as few batches as `rows_per_batch` allows, with the rows
    shared out evenly (17 rows at 16 per batch make 8 + 9, not a 16-row batch and a 1-row batch that would leave
    the GPU idle).

    flat: each batch's rows laid end to end as one row, which drops the padding between rows. Only for flash
    varlen attention, whose cost does not depend on the row length; a dense mask would grow quadratically."""
    rows = pack_rows(ds.lengths[idx], row_len)
    n_batches = -(-len(rows) // rows_per_batch)
    for k in range(n_batches):
        part = rows[k * len(rows) // n_batches: (k + 1) * len(rows) // n_batches]
        samples = [[ds[int(idx[j])] for j in row] for row in part]
        yield [j for row in part for j in row], collate([[s for row in samples for s in row]] if flat else samples,
                                                        pad_id)


def micro_batches(ds, idx: np.ndarray, row_len: int, rows_per_batch: int, pad_id: int, flat: bool = False):
    """The Batches of `packed_batches`."""
    for _, batch in packed_batches(ds, idx, row_len, rows_per_batch, pad_id, flat):
        yield batch


@torch.no_grad()
def heldout_loss(model, ds, row_len: int, rows_per_batch: int, pad_id: int, device,
                 rank: int = 0, world: int = 1, all_sum: Callable = lambda t: t) -> float:
    """Token-mean next-token loss over a whole split; with world > 1 each rank takes every world-th batch."""
    totals = torch.zeros(2, dtype=torch.float64, device=device)
    batches = micro_batches(ds, np.arange(len(ds)), row_len, rows_per_batch, pad_id, flash_varlen_on(device))
    for k, batch in enumerate(batches):
        if k % world == rank:
            batch = batch.to(device)
            totals[0] += token_loss_sum(model, batch).double()
            totals[1] += batch.target_mask.sum()
    all_sum(totals)
    return (totals[0] / totals[1]).item()


@torch.no_grad()
def sample_losses(model, ds, row_len: int, rows_per_batch: int, pad_id: int, device) -> tuple[np.ndarray, np.ndarray]:
    """Each sample's summed next-token loss (float64) and its number of target tokens, in the split's order,
    batched as `heldout_loss` batches (the same sums, split by sample): what a paired comparison of two models
    on the same samples needs. A sample's targets are its loss-masked tokens after its first."""
    counts = ds.target_counts()
    sums = np.zeros(len(ds))
    for order, batch in packed_batches(ds, np.arange(len(ds)), row_len, rows_per_batch, pad_id,
                                       flash_varlen_on(device)):
        losses = target_losses(model, batch.to(device)).double().cpu()
        sums[order] = [float(x.sum()) for x in losses.split(counts[order].tolist())]
    return sums, counts
