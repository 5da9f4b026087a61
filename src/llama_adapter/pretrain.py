"""Pre-training a small base LLaMA from scratch: the demo's stand-in for Meta's weights.

The demo must run offline from the repository alone, so it cannot download a base model. It trains one
(all parameters, next-token loss) on the generated corpus and writes it in Meta's layout with its
tokenizer beside it, so every later stage loads it exactly as it would load LLaMA-7B.
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .checkpoint import save_meta_checkpoint
from .config import PRETRAIN_SUMMARY, ModelArgs, PretrainConfig
from .data.demo import read_corpus
from .io import atomic_dir, write_json
from .model import Transformer
from .tokenizer import load_tokenizer


def token_stream(corpus: Path, tokenizer) -> np.ndarray:
    """The corpus as one stream: BOS doc EOS BOS doc EOS ..."""
    ids: list[int] = []
    for doc in read_corpus(corpus):
        ids += tokenizer.encode(doc, bos=True, eos=True)
    return np.asarray(ids, dtype=np.int64)


def check_seq_len(seq_len: int, args: ModelArgs) -> None:
    """A window fits the model's context (the command line checks the preset's before the command starts)."""
    from .errors import InputError

    if seq_len > args.max_seq_len:
        raise InputError(f"--seq-len {seq_len}: longer than the preset's max_seq_len {args.max_seq_len}")


def pretrain_base(corpus: Path, tokenizer_path: Path, out_dir: Path, args: ModelArgs | None = None,
                  cfg: PretrainConfig = PretrainConfig()) -> dict:
    """Train `args` (default: cfg.preset's; vocab_size taken from the tokenizer) on random windows of the corpus;
    write params.json, consolidated.00.pth, tokenizer.model and pretrain.json to out_dir."""
    steps, batch_size, seq_len, lr, seed, device = cfg.steps, cfg.batch_size, cfg.seq_len, cfg.lr, cfg.seed, cfg.device
    from .errors import InputError, TrainingDiverged

    if Path(tokenizer_path).suffix != ".model" or not Path(tokenizer_path).is_file():
        raise InputError(f"--tokenizer {tokenizer_path}: expected a SentencePiece .model file (it is copied beside the "
                         "weights as tokenizer.model)")
    tokenizer = load_tokenizer(tokenizer_path)
    args = args or ModelArgs.from_name(cfg.preset)
    args = ModelArgs.from_dict({**args.to_dict(), "vocab_size": tokenizer.vocab_size})
    check_seq_len(seq_len, args)
    stream = torch.from_numpy(token_stream(corpus, tokenizer))
    if len(stream) <= seq_len + 1:
        raise InputError(f"{corpus}: {len(stream)} tokens, too few for windows of --seq-len {seq_len}; expected a "
                         f"corpus of more than {seq_len + 1} tokens")
    torch.manual_seed(seed)
    model = Transformer(args)
    for name, p in model.named_parameters():  # small init, as LLaMA-style models are trained
        if p.dim() == 2:
            torch.nn.init.normal_(p, std=0.02)
    model.to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1)
    generator = torch.Generator().manual_seed(seed)
    losses = []
    for step in range(steps):
        warm = min(1.0, (step + 1) / (steps * 0.05))
        for g in opt.param_groups:
            g["lr"] = lr * warm * 0.5 * (1 + math.cos(math.pi * step / steps))
        starts = torch.randint(0, len(stream) - seq_len - 1, (batch_size,), generator=generator)
        window = torch.stack([stream[s: s + seq_len + 1] for s in starts.tolist()]).to(device)  # (B, T+1)
        logits = model(window[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1), window[:, 1:].flatten())
        losses.append(loss.item())  # read once: the check, the summary and the log line share it
        if not math.isfinite(losses[-1]):  # the weights diverged: what is written would be a base of NaN
            raise TrainingDiverged(f"pretrain step {step + 1}/{steps}: loss {losses[-1]} at --lr {lr:g}; expected a "
                                   "finite loss: lower --lr")
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if (step + 1) % 50 == 0 or step + 1 == steps:
            print(f"pretrain step {step + 1}/{steps} loss {losses[-1]:.4f}", flush=True)
    summary = {"args": args.to_dict(), "steps": steps, "batch_size": batch_size, "seq_len": seq_len, "lr": lr,
               "seed": seed, "corpus_tokens": len(stream), "first_loss": losses[0], "final_loss": losses[-1],
               "parameters": sum(p.numel() for p in model.parameters())}
    with atomic_dir(Path(out_dir)) as tmp:
        save_meta_checkpoint(model.cpu(), tmp)
        shutil.copyfile(tokenizer_path, tmp / "tokenizer.model")
        write_json(tmp / PRETRAIN_SUMMARY, {**summary, "losses": losses})
    return summary
