"""Fine-tuning (the adapter, or a baseline method: methods.py): the paper's recipe, exactly resumable, on CPU, one
GPU or `torchrun` over several.

Recipe (paper and its released code): AdamW(β 0.9/0.95, weight decay 0.02) on what the method tunes,
lr = blr · global_batch / 256 with blr 9e-3, linear warm-up over 2 epochs then half-cosine to 0 over 5,
recomputed at every optimizer step; global batch 64 samples, the paper's text. The released script
(alpaca_finetuning_v1/finetuning.sh: 8 GPUs x --batch_size 4) ran 32 samples a step, so its peak lr was
1.125e-3 where ours is 2.25e-3, over twice the steps: --global-batch 32 gives the released run's schedule.

What differs, and why:
- Every sample trains in every epoch: an epoch's last step holds the samples left over (26 of Alpaca's 51,802 at
  64), where the released loader drops them (drop_last) and with them other samples each epoch.
- bf16 base under bf16 autocast, the trained tensors in fp32, no loss scaling; the released code kept the base in
  fp16 with a gradient scaler (bf16 needs none: its range is fp32's).
- The multimodal projection's biases take weight decay like every trained tensor (the released v1 code has no
  multimodal adapter; timm's convention, which LLaMA-Adapter's later code follows, exempts biases).
- No padding: each step's samples are packed into rows (batching.py) instead of padded to 512.
- The loss is the mean over all target tokens of the global batch. The released code averages per
  micro-batch means, which makes the weighting depend on the micro-batch size and GPU count; ours gives
  the same number on 1 or N processes and with any packing.
- Data parallelism is one all-reduce of the adapter gradients per optimizer step. DDP's bucketed hooks
  buy nothing for 1.2M parameters and would force every rank to run the same number of micro-batches.
  With --fsdp the blocks are sharded (FSDP2); what trains inside them (LoRA, full fine-tuning) has its
  gradients reduce-scattered by FSDP instead.

Data order is a pure function of (seed, epoch), so a checkpoint needs only the step count to resume
exactly: a killed and resumed run reproduces the uninterrupted run's losses bit for bit on CPU.

SIGTERM (SLURM's time limit, scancel, preemption) and SIGUSR1 (a warning signal asked with sbatch --signal) do
not kill a run: it saves a checkpoint at the next step boundary, every rank at the same one, and stops with
TrainingInterrupted; `--resume` continues from there.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import signal
import socket
import sys
import threading
import time
import zipfile
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)
from torch.distributed.tensor import DTensor

from .batching import heldout_loss, micro_batches, pack_rows, token_loss_sum
from .checkpoint import check_state, listed, non_finite_counts, value_range
from .config import PEFT_CONFIG, TRAINING_CONFIG, TRAINING_METRICS, WEIGHTS, TrainConfig, training_outputs
from .data import TOKEN_STATS
from .data.tokens import TokenDataset, split_tokenizer
from .devices import device_name, pick_device, pick_dtype
from .errors import (
    STOPS,
    CheckpointError,
    DataError,
    GPUAllocationError,
    InputError,
    NonFiniteValues,
    OutputInUse,
    PipelineError,
    TokenizerError,
    TrainingDiverged,
)
from .io import atomic_path, hold, read_json_object, remove_output, write_json
from .methods import load_for_training, save_tuned, trains, tuned_state
from .model import Transformer, flash_varlen_on
from .multimodal import ImageFeatures
from .quantize import float8_matmuls
from .tokenizer import tokenizer_param
from .tracking import Tracker, progress


def lr_at(step: int, steps_per_epoch: int, cfg: TrainConfig) -> float:
    """The released code's per-iteration schedule, on the fractional epoch."""
    epoch = step / steps_per_epoch
    peak = cfg.peak_lr()
    if epoch < cfg.warmup_epochs:
        return peak * epoch / cfg.warmup_epochs
    progress_ = (epoch - cfg.warmup_epochs) / max(cfg.epochs - cfg.warmup_epochs, 1e-8)
    return cfg.min_lr + (peak - cfg.min_lr) * 0.5 * (1.0 + math.cos(math.pi * min(progress_, 1.0)))


def schedule_warning(cfg: TrainConfig, steps_per_epoch: int, first_step: int, last_step: int) -> str | None:
    """What is odd about the rates of the steps this run takes (from first_step, 0-based, to last_step), if anything:
    every one of them at learning rate 0, where the warm-up starts (a one-step run, --max-steps 1, trains nothing);
    or a warm-up as long as the run or longer (--warmup-epochs >= --epochs), where the learning rate climbs to the
    end and never decays. A warning, not an error: quick runs rely on both (a one-epoch smoke training at the
    default two warm-up epochs, or at a config's one)."""
    if last_step <= first_step:
        return None
    # The rate rises through the warm-up from 0 and falls through the decay, reaching 0 (min_lr) only past the last
    # step: a run whose first and last steps have rate 0 has it at every step.
    first, last = (lr_at(s, steps_per_epoch, cfg) for s in (first_step, last_step - 1))
    if first == last == 0:
        steps = f"step {last_step}" if last_step - first_step == 1 else f"steps {first_step + 1} to {last_step}"
        return (f"every step this run takes ({steps} of {steps_per_epoch * cfg.epochs}) has learning rate 0, where "
                f"the warm-up of --warmup-epochs {cfg.warmup_epochs:g} starts: it trains nothing; give more steps, or "
                "--warmup-epochs 0")
    if cfg.warmup_epochs < cfg.epochs:
        return None
    return (f"--warmup-epochs {cfg.warmup_epochs:g} >= --epochs {cfg.epochs}: the learning rate climbs for the whole "
            f"run and never decays, reaching {last:g} (of its peak {cfg.peak_lr():g}) at its last step; fine "
            "for a quick run, otherwise give fewer warm-up epochs than epochs")


def epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(n)


def step_samples(n: int, cfg: TrainConfig, step: int) -> np.ndarray:
    """Sample indices of optimizer step `step` (all ranks): consecutive slices of the epoch's order."""
    steps_per_epoch = math.ceil(n / cfg.global_batch)
    epoch, i = divmod(step, steps_per_epoch)
    return epoch_order(n, cfg.seed, epoch)[i * cfg.global_batch: (i + 1) * cfg.global_batch]


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")
    nodes: int = 1  # torchrun's worker groups: one per node (GROUP_WORLD_SIZE)
    per_node: int = 1  # processes on each node (LOCAL_WORLD_SIZE): its GPUs, or 1 on a CPU node

    def layout(self) -> dict[str, int]:
        return {"nodes": self.nodes, "processes_per_node": self.per_node, "world_size": self.world}

    def all_sum(self, t: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t

    def all_max(self, value: int) -> int:
        if self.world == 1:
            return value
        t = torch.tensor([value], dtype=torch.int64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return int(t.item())


def check_gpus(expected: int) -> None:
    """Fail before loading anything when the job does not see the GPUs it asked for (a scheduler may hand a
    job fewer GPUs than requested, and training would then silently run slower or on CPU). `expected` counts the
    GPUs of this node, which torchrun gives one process each: on several nodes, each node checks its own."""
    visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
    local = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1")))
    if expected > 0 and (visible != expected or local not in (1, expected)):
        raise GPUAllocationError(
            f"the job requested {expected} GPU(s) per node but {socket.gethostname()} sees {visible} "
            f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}) with {local} process(es) on "
            "it; check the scheduler's GPU allocation (SLURM: --gpus / gres) or the rule's gpu resource")


def check_world_size(expected: int) -> None:
    """Fail before loading anything unless the job's processes number `expected` (nodes x processes per node):
    a rendezvous that formed with fewer nodes than the job has, or a launch that lost a node's processes."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world != expected:
        nodes = os.environ.get("GROUP_WORLD_SIZE", "1")
        raise GPUAllocationError(
            f"the job expected {expected} training process(es) in all but runs {world} ({nodes} node(s) x "
            f"{os.environ.get('LOCAL_WORLD_SIZE', '1')} per node); check the rule's nodes and gpu resources and "
            "the allocation (SLURM: --nodes, --gpus)")


def setup_distributed(cfg: TrainConfig) -> Dist:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(cfg.device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    nodes = int(os.environ.get("GROUP_WORLD_SIZE", "1")) if world > 1 else 1
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", str(world))) if world > 1 else 1
    return Dist(dist.get_rank() if world > 1 else 0, world, device, nodes, per_node)


def shard_model(model: Transformer, method: str, d: Dist) -> Transformer:
    """FSDP2: each process keeps 1/world of every block's weights and gathers a block only while it runs.

    The adapter trains on a frozen base: the blocks are sharded, its prompts and gates (on the root module) stay
    whole on every process, and the training loop all-reduces their gradients as in the unsharded case. LoRA and
    full fine-tuning train weights inside the blocks (full: the root's embedding, norm and output too), so the
    root is sharded as well and FSDP reduce-scatters the gradient of every sharded weight that trains."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FSDPModule, fully_shard, register_fsdp_forward_method

    mesh = init_device_mesh(d.device.type, (d.world,))
    for layer in model.layers:
        fully_shard(layer, mesh=mesh)
    if method != "adapter":
        fully_shard(model, mesh=mesh)
        # The loss calls hidden_states, then the output projection on the target positions only: FSDP gathers
        # the root's weights around hidden_states as around forward (the root keeps them gathered until backward).
        register_fsdp_forward_method(model, "hidden_states")
    for module in model.modules():
        if isinstance(module, FSDPModule):
            # FSDP averages a gradient over the processes by default; each process's loss here is already divided
            # by the step's global target count, so the gradient is their sum (a plain SUM, which Gloo has too).
            module.set_gradient_divide_factor(1.0)
            module.set_force_sum_reduction_for_comms(True)
    return model.to(d.device)


def is_sharded(p: torch.Tensor) -> bool:
    return isinstance(p, DTensor)


def gate_magnitudes(model: Transformer) -> dict[str, float]:
    """Mean |tanh(gate)| per adapted layer, keyed by the layer's index in the model (none without an adapter)."""
    if getattr(model, "adapter", None) is None:
        return {}
    first = model.first_adapted_layer()
    g = model.adapter_gate.detach().tanh().abs().mean(dim=1).tolist()
    return {f"gate/layer_{first + i:02d}": v for i, v in enumerate(g)}


def rank_batches(ds: TokenDataset, idx: np.ndarray, cfg: TrainConfig, d: Dist):
    """(batch, weight) pairs of this rank's share of a step. Under FSDP every rank must run as many
    forward passes as the busiest one (each pass gathers the sharded layers collectively), so the
    shorter ranks repeat their first batch with weight 0."""
    share = lambda r: idx[r:: d.world]  # noqa: E731
    flat = flash_varlen_on(d.device)
    mine = list(micro_batches(ds, share(d.rank), cfg.row_len, cfg.rows_per_micro_batch, cfg.pad_id, flat))
    busiest = len(mine)
    if cfg.fsdp and d.world > 1:
        busiest = max(math.ceil(len(pack_rows(ds.lengths[share(r)], cfg.row_len)) / cfg.rows_per_micro_batch)
                      for r in range(d.world))
    if busiest == len(mine):
        return [(b, 1) for b in mine]
    filler = mine[0] if mine else next(micro_batches(ds, idx[:1], cfg.row_len, 1, cfg.pad_id, flat))
    return [(b, 1) for b in mine] + [(filler, 0)] * (busiest - len(mine))


def evaluate_loss(model: Transformer, ds: TokenDataset, cfg: TrainConfig, d: Dist) -> float:
    # Under FSDP every rank evaluates every batch (collective forwards); otherwise they share the split.
    rank, world = (0, 1) if cfg.fsdp and d.world > 1 else (d.rank, d.world)
    model.eval()  # LoRA's dropout off; the adapter and the base have none
    try:
        with autocast(d.device):
            return heldout_loss(model, ds, cfg.row_len, cfg.rows_per_micro_batch, cfg.pad_id, d.device, rank, world,
                                d.all_sum if world > 1 else (lambda t: t))
    finally:
        model.train()


def autocast(device: torch.device):
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()


# Settings that may change between a run and its resumption without changing its results.
# (A checkpoint holds whole tensors by name, so sharding and the number of processes may change too.)
# rows_per_micro_batch too, except under LoRA's dropout, which draws its masks a micro-batch at a time (restore).
RESUMABLE_CHANGES = ("checkpoint_every", "max_steps", "device", "compile", "compile_cache", "run_name", "tags",
                     "rows_per_micro_batch", "fsdp")


# What trains and its optimizer state, whole, keyed by parameter name (torch.distributed.checkpoint's state
# dicts): the same file for any number of processes, sharded or not, so a run may resume on another world size.
# Gathering is collective under FSDP (every process calls it); the tensors land on rank 0's CPU.
FULL_STATE = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
CHECKPOINT_FORMAT = "llama-adapter/checkpoint/2"


def checkpoint_state(model, opt, step: int, history: list[dict], cfg: TrainConfig, run_id: str | None,
                     initial_val_loss: float | None, inputs: dict[str, str | None], d: Dist) -> dict:
    """What a resumption needs (collective: every process calls it). `inputs`: the digests of what the run trains
    on, by option (the base's base_digest, the splits' TokenDataset.digest). Every process's random state is kept
    (LoRA's dropout draws from it, each process as many times as its micro-batches), so each continues its own."""
    tuned, optimizer = get_state_dict(model, opt, options=FULL_STATE)
    rng = {"cpu": torch.get_rng_state(),
           "cuda": torch.cuda.get_rng_state(d.device) if d.device.type == "cuda" else None}
    ranks_rng = [rng]
    if d.world > 1:
        ranks_rng = [None] * d.world
        dist.all_gather_object(ranks_rng, rng)
    return {"format": CHECKPOINT_FORMAT, "tuned": tuned, "optimizer": optimizer,
            "step": step, "history": history, "torch_rng": rng["cpu"], "ranks_rng": ranks_rng,
            "mlflow_run_id": run_id, "initial_val_loss": initial_val_loss, "inputs": inputs,
            "config": json.dumps(fixed_settings(cfg), sort_keys=True), "rows_per_micro_batch": cfg.rows_per_micro_batch}


def non_finite_state(model: Transformer, opt: torch.optim.Optimizer, method: str, d: Dist) -> list[str]:
    """The trained tensors and AdamW moments holding NaN or infinity, named as a checkpoint keeps them
    (check_checkpoint) with their counts; empty where all are finite (non_finite_named: collective). Every step's
    gradient was finite (non_finite_gradients), so what this finds is the optimizer's own update overflowing."""
    named = {}
    for n, p in tuned_state(model, method).items():
        moments = opt.state.get(p, {})
        named[tuned_key(n)] = p
        named.update((moment_key(n, kind), moments[kind]) for kind in ADAMW_MOMENTS if kind in moments)
    return non_finite_named(named, d)


def non_finite_gradients(model: Transformer, method: str, d: Dist) -> list[str]:
    """The gradients of the trained tensors holding NaN or infinity after a step's backward (and all-reduce), named
    by their tensor; empty where all are finite (non_finite_named: collective). A non-finite gradient under a finite
    loss (an overflow in the backward) would reach the trained tensors and AdamW's moments through the optimizer
    step: checked before it, at every step, so the run stops at the step that made it, with the state still good."""
    return non_finite_named({f"{tuned_key(n)}'s gradient": p.grad
                             for n, p in tuned_state(model, method).items() if p.grad is not None}, d)


def step_unless_non_finite(model: Transformer, opt: torch.optim.Optimizer, method: str, d: Dist) -> list[str]:
    """After a step's backward: the optimizer's step and the gradients cleared, unless a trained tensor's gradient
    holds NaN or infinity (non_finite_gradients: collective); then nothing steps and those tensors are returned.
    What every training step ends with, in train and in benchmarks/train_throughput.py alike."""
    if found := non_finite_gradients(model, method, d):
        return found
    opt.step()
    opt.zero_grad(set_to_none=True)
    return []


def non_finite_named(named: dict[str, torch.Tensor], d: Dist) -> list[str]:
    """The tensors of `named` holding NaN or infinity, each with its counts; empty where all are finite. Collective
    (every process calls it): each checks what it holds, its own shards of a sharded tensor, one aminmax per tensor
    (value_range, as check_state) and one device sync for all; the processes agree, and where any found some,
    every one returns them all."""
    local = {}  # name: (this process's tensor or shard, whether sharded)
    for key, t in named.items():
        sharded = is_sharded(t)
        t = (t.to_local() if sharded else t).detach()
        if t.numel():  # a process may hold no elements of a small sharded tensor (aminmax refuses an empty one)
            local[key] = (t, sharded)
    finite = (torch.stack([torch.stack(value_range(t)).float() for t, _ in local.values()]).isfinite().all(dim=1)
              .tolist() if local else [])
    mine = [(k, non_finite_counts(t), sharded) for (k, (t, sharded)), ok in zip(local.items(), finite) if not ok]
    if d.all_max(len(mine)) == 0:
        return []
    every = [mine]
    if d.world > 1:
        every = [None] * d.world
        dist.all_gather_object(every, mine)
    found = {}  # an unsharded tensor is the same on every process (its gradient all-reduced): named once
    for rank, items in enumerate(every):
        for k, counts, sharded in items:
            found.setdefault(f"{k} (process {rank}'s shard)" if sharded else k, counts)
    return [f"{k}: {counts}" for k, counts in found.items()]


def base_digest(model: Transformer) -> str:
    """sha256 of a loaded base's shapes and a sample of every weight (its first 256 values): a base that is not
    the one a run started on (another shape, or retrained at the same path) tells itself apart, without a
    full read of billions of weights. Taken before training changes any."""
    digest = hashlib.sha256(json.dumps(model.args.to_dict(), sort_keys=True).encode())
    for name, p in model.named_parameters():
        if not model.is_added_param(name):
            digest.update(name.encode())
            digest.update(p.detach().flatten()[:256].float().cpu().numpy().tobytes())
    return digest.hexdigest()


def fixed_settings(cfg: TrainConfig) -> dict:
    """The settings a resumption must share with the run it continues (LoRA's only where a LoRA trains)."""
    return {k: v for k, v in asdict(cfg).items()
            if k not in RESUMABLE_CHANGES and (cfg.method == "lora" or not k.startswith("lora_"))}


def is_count(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def is_rng_state(v) -> bool:
    """torch.get_rng_state's form (torch.cuda's too): a vector of bytes; set_rng_state takes nothing else."""
    return isinstance(v, torch.Tensor) and v.dtype == torch.uint8 and v.dim() == 1


def is_json_object(v) -> bool:
    try:
        return isinstance(v, str) and isinstance(json.loads(v), dict)
    except json.JSONDecodeError:
        return False


def is_optimizer_state(v) -> bool:
    """get_state_dict's optimizer state: tensors by parameter name and kind, and a list of groups of settings."""
    return (isinstance(v, dict) and set(v) == {"state", "param_groups"} and isinstance(v["state"], dict)
            and all(isinstance(s, dict) and all(isinstance(t, torch.Tensor) for t in s.values())
                    for s in v["state"].values())
            and isinstance(v["param_groups"], list) and all(isinstance(g, dict) for g in v["param_groups"]))


# checkpoint_state's entries: (whether a checkpoint of this format may lack it, written before it was kept; the check;
# what is expected). Read back, an entry of another type failed in restore or mid-run with a bare Python or torch
# error, or was taken as it is (a float step numbered the log's lines 4.0, 5.0...).
CHECKPOINT_ENTRIES = {
    "format": (False, lambda v: isinstance(v, str), "a string"),
    "tuned": (False, lambda v: isinstance(v, dict) and all(isinstance(t, torch.Tensor) for t in v.values()),
              "a dict of tensors by parameter name"),
    "optimizer": (False, is_optimizer_state, "an optimizer state ({'state': {name: {kind: tensor}}, 'param_groups': "
                                             "[{setting: value}]})"),
    "step": (False, is_count, "a non-negative integer"),
    "history": (False, lambda v: isinstance(v, list) and all(isinstance(h, dict) for h in v),
                "a list of each step's metrics"),
    "torch_rng": (False, is_rng_state, "a torch.uint8 vector (torch.get_rng_state)"),
    "ranks_rng": (True, lambda v: isinstance(v, list) and len(v) > 0 and all(
        isinstance(r, dict) and set(r) == {"cpu", "cuda"} and is_rng_state(r["cpu"])
        and (r["cuda"] is None or is_rng_state(r["cuda"])) for r in v),
        "a list of {'cpu': random state, 'cuda': random state or None}, one a process"),
    "mlflow_run_id": (False, lambda v: v is None or isinstance(v, str), "a string or None"),
    "initial_val_loss": (True, lambda v: v is None or (isinstance(v, float) and math.isfinite(v)),
                         "a finite float or None"),
    "inputs": (True, lambda v: isinstance(v, dict) and all(d is None or isinstance(d, str) for d in v.values()),
               "a dict of digests by option"),
    "config": (False, is_json_object, "a JSON object of the run's settings"),
    "rows_per_micro_batch": (True, lambda v: is_count(v) and v > 0, "a positive integer"),
}

# What AdamW (amsgrad off) keeps of each trained tensor: its two moments, of the tensor's shape and dtype, and
# its step count (a scalar), once it has taken a step.
ADAMW_MOMENTS = ("exp_avg", "exp_avg_sq")


def tuned_key(name: str) -> str:
    """A trained tensor's name in the checkpoint (its `tuned` entry), as errors name it."""
    return f"tuned.{name}"


def moment_key(name: str, kind: str) -> str:
    """A trained tensor's optimizer state `kind` (an ADAMW_MOMENTS or its step) in the checkpoint, as errors name it."""
    return f"optimizer.state.{name}.{kind}"


def a_type(v) -> str:
    kind = type(v).__name__
    return f"a{'n' if kind[0] in 'aeiou' else ''} {kind}"


def shown(v) -> str:
    """A value read back, briefly, with its type: an error names what was found without printing a tensor."""
    if isinstance(v, torch.Tensor):
        return f"a {v.dtype} tensor of shape {tuple(v.shape)}"
    return f"{repr(v)[:40]} ({a_type(v)})"


def check_same_run(state: dict, ckpt_path: Path, cfg: TrainConfig, inputs: dict[str, str | None]) -> None:
    """InputError where the settings, or what the paths of the base and the splits hold (`inputs`, as
    checkpoint_state keeps them), are not the run's that wrote the checkpoint."""
    saved = json.loads(state["config"])
    now = json.loads(json.dumps(fixed_settings(cfg)))  # as saved: tuples become lists
    changed = {k: (saved.get(k), v) for k, v in now.items() if saved.get(k) != v}
    if changed:
        changes = "; ".join(f"--{k.replace('_', '-')} {then!r} then, {v!r} now" for k, (then, v) in changed.items())
        raise InputError(f"{ckpt_path}: cannot resume, the run's settings changed: {changes}; expected the settings "
                         f"the checkpoint was written with, or delete {ckpt_path} and "
                         f"{previous_checkpoint(ckpt_path).name} to train from the start")
    rows = state.get("rows_per_micro_batch", cfg.rows_per_micro_batch)  # not kept before it was checked
    if cfg.method == "lora" and cfg.lora_dropout > 0 and rows != cfg.rows_per_micro_batch:
        # Each forward draws LoRA's dropout masks for its rows: other micro-batches, other masks, other results.
        raise InputError(f"{ckpt_path}: cannot resume with --rows-per-micro-batch {cfg.rows_per_micro_batch}: the run "
                         f"that wrote it drew LoRA's dropout masks {rows} rows at a time, and other micro-batches "
                         f"draw other masks (--lora-dropout {cfg.lora_dropout:g}); resume with --rows-per-micro-batch "
                         f"{rows}")
    paths = {"--base": cfg.base, "--train-data": cfg.train_data, "--val-data": cfg.val_data,
             "--image-features": cfg.image_features}
    others = [f"{option} {paths[option]}" for option, digest in inputs.items()
              if option in state.get("inputs", {}) and state["inputs"][option] != digest]
    if others:
        raise InputError(f"{ckpt_path}: cannot resume, {' and '.join(others)} hold(s) another model or other samples "
                         f"than the run that wrote it started on; delete {ckpt_path} and "
                         f"{previous_checkpoint(ckpt_path).name} to train from the start")


def check_checkpoint(state, ckpt_path: Path, cfg: TrainConfig, inputs: dict[str, str | None], model: Transformer,
                     opt: torch.optim.Optimizer) -> None:
    """A checkpoint read back (torch.load) as checkpoint_state writes it for this run, model and optimizer: its
    entries of their types, the optimizer's settings of the types the optimizer holds, then the run's settings and
    inputs (check_same_run: InputError), then every trained tensor and AdamW moment of its parameter's name, shape and
    dtype (set_state_dict casts another dtype silently and leaves an extra tensor out). CheckpointError naming the
    entry or tensor; NonFiniteValues (check_state) for tensors holding NaN or infinity."""
    if not isinstance(state, dict):
        raise CheckpointError(f"not a training checkpoint: a {type(state).__name__}")
    if state.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"format {state.get('format')!r}, expected {CHECKPOINT_FORMAT!r} (written by another "
                              "version of llama-adapter)")
    missing = sorted(k for k, (optional, _, _) in CHECKPOINT_ENTRIES.items() if not optional and k not in state)
    unexpected = sorted(map(str, set(state) - set(CHECKPOINT_ENTRIES)))
    wrong = [f"{k}: {shown(state[k])}; expected {expected}"
             for k, (_, fits, expected) in CHECKPOINT_ENTRIES.items() if k in state and not fits(state[k])]
    problems = [f"missing entries: {listed(missing)}"] * bool(missing) + \
               [f"unexpected entries: {listed(unexpected)}"] * bool(unexpected) + wrong
    optimizer = state.get("optimizer")
    if not problems:  # the optimizer's settings, by group: the optimizer loads each group's from the file
        groups = optimizer["param_groups"]
        if len(groups) != len(opt.param_groups):
            problems.append(f"optimizer.param_groups: {len(groups)} groups; expected {len(opt.param_groups)}")
        for i, (saved, live) in enumerate(zip(groups, opt.param_groups)):
            if "params" not in saved:
                problems.append(f"optimizer.param_groups[{i}]: missing params")
            problems += [f"optimizer.param_groups[{i}].{k}: {a_type(saved[k])}; expected {a_type(live[k])}"
                         for k in sorted(set(saved) & set(live) - {"params"}) if type(saved[k]) is not type(live[k])]
    if problems:
        raise CheckpointError("not a training checkpoint of this run: " + "; ".join(problems))
    # Before the tensors: another base or other settings make them of other shapes, which this names by its option.
    check_same_run(state, ckpt_path, cfg, inputs)
    method = cfg.method
    # Under the names the file keeps them by: the trained tensors as the model's state dict holds them (a tied output
    # too), the optimizer's state once per parameter.
    trained = {tuned_key(n): p for n, p in model.named_parameters(remove_duplicate=False) if trains(method, n)}
    moments = {}
    if state["step"] > 0:  # every trained tensor has taken every step (train_step gives each a gradient)
        moments = {moment_key(n, kind): p for n, p in tuned_state(model, method).items() for kind in ADAMW_MOMENTS}
    expected = {k: p.shape for k, p in (trained | moments).items()}
    expected |= {moment_key(n, "step"): torch.Size([]) for n in tuned_state(model, method)} if moments else {}
    found = {tuned_key(n): t for n, t in state["tuned"].items()}
    found |= {moment_key(n, kind): t for n, kinds in optimizer["state"].items() for kind, t in kinds.items()}
    check_state(expected, found, "the training state", dtypes={k: p.dtype for k, p in (trained | moments).items()})


def previous_checkpoint(ckpt_path: Path) -> Path:
    """checkpoint.prev.pt: the last complete checkpoint before the newest, kept until the newest is in place."""
    return ckpt_path.with_name(f"{ckpt_path.stem}.prev{ckpt_path.suffix}")


def save_checkpoint(state: dict, ckpt_path: Path, keep_previous: bool) -> None:
    """Write the checkpoint under a temporary name, flushed to disk, then rename it onto `ckpt_path`: a run
    killed while saving leaves the last checkpoint whole. The one it replaces stays as checkpoint.prev.pt (a
    hard link, or a copy where the filesystem has none), the fallback should the newest prove unreadable;
    keep_previous=False (a fresh run's first save) removes an older run's instead."""
    prev = previous_checkpoint(ckpt_path)
    with atomic_path(ckpt_path) as tmp:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        if keep_previous and ckpt_path.exists():
            with atomic_path(prev) as link:
                os.unlink(link)
                try:
                    os.link(ckpt_path, link)
                except OSError:
                    shutil.copyfile(ckpt_path, link)
        else:
            prev.unlink(missing_ok=True)


def remove_checkpoints(ckpt_path: Path) -> None:
    for path in (previous_checkpoint(ckpt_path), ckpt_path):  # never a previous one left without the newest
        path.unlink(missing_ok=True)


def check_records(path: Path) -> str | None:
    """The first record of a torch.save file (a zip archive) whose bytes do not match the CRC-32 written with them;
    None when all do."""
    with zipfile.ZipFile(path) as archive:
        return archive.testzip()


def read_checkpoint(ckpt_path: Path, cfg: TrainConfig, inputs: dict[str, str | None], model: Transformer,
                    opt: torch.optim.Optimizer, announce: bool = True) -> tuple[dict, Path] | None:
    """The newest usable checkpoint and its path: checkpoint.pt, else checkpoint.prev.pt (saying so in one line on
    stderr); None without checkpoint.pt (deleting it starts afresh). Usable: readable whole, and as checkpoint_state
    writes it for this run (check_checkpoint). CheckpointError, naming the files, when none is; InputError (no
    fallback: the previous checkpoint is of the same run) where the run's settings or inputs changed;
    TrainingDiverged for one holding NaN or infinity."""
    if not ckpt_path.exists():
        return None
    paths = [p for p in (ckpt_path, previous_checkpoint(ckpt_path)) if p.exists()]
    problems = []
    for path in paths:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
            damaged = check_records(path)
            if damaged is not None:  # torch.load reads a tensor's bytes as they are, damaged or not
                raise ValueError(f"its record {damaged} fails its CRC-32 check (damaged in place)")
            check_checkpoint(state, path, cfg, inputs, model, opt)
        except InputError:
            raise
        except NonFiniteValues as e:
            # Its records pass their CRC-32 check: the run wrote these values, having diverged (an earlier version
            # saved what a non-finite gradient under a finite loss made of the weights and moments; the gradients
            # and the state are now checked before each step and each save, but such a checkpoint may remain). The
            # previous checkpoint would replay the same steps into them, so the run stops as at a NaN loss instead of
            # falling back as from damaged bytes.
            raise TrainingDiverged(
                f"cannot resume: {path} (step {state['step']}) holds NaN or infinity ({len(e.found)}): "
                f"{listed(e.found)}; its bytes are as written, so the run diverged before that step, and resuming "
                f"from an earlier checkpoint would replay the same steps: delete {' and '.join(map(str, paths))} to "
                "train from the start, with other settings (a lower --blr?)") from None
        except Exception as e:  # truncated, empty, damaged, not a torch file, not ours, not this run's
            reason = (str(e).strip().splitlines() or [""])[0]
            problems.append(f"{path} is unreadable ({path.stat().st_size} bytes; {type(e).__name__}: {reason})")
            continue
        if problems and announce:
            print(f"llama-adapter train: {problems[0]}; resuming from the previous checkpoint {path} "
                  f"(step {state['step']})", file=sys.stderr, flush=True)
        return state, path
    raise CheckpointError(f"cannot resume: {'; '.join(problems)}; "
                          f"delete {' and '.join(str(p) for p in paths)} to train from the start")


def restore(state: dict, model: Transformer, opt: torch.optim.Optimizer, d: Dist):
    """Load a checkpoint's state (read_checkpoint, which checked it) into model and optimizer; (step, history, MLflow
    run id, initial val loss) to continue from."""
    # Every process holds the whole state (each read the file); sharded parameters keep their own shards.
    set_state_dict(model, opt, model_state_dict=state["tuned"], optim_state_dict=state["optimizer"],
                   options=StateDictOptions(full_state_dict=True, strict=False))
    # Each process continues its own random stream; on another number of processes (or from a checkpoint that kept
    # rank 0's alone) every process takes rank 0's, and LoRA's dropout draws differ from an uninterrupted run's.
    ranks_rng = state.get("ranks_rng") or [{"cpu": state["torch_rng"], "cuda": None}]
    rng = ranks_rng[d.rank] if len(ranks_rng) == d.world else ranks_rng[0]
    torch.set_rng_state(rng["cpu"])
    if rng["cuda"] is not None and d.device.type == "cuda":
        torch.cuda.set_rng_state(rng["cuda"], d.device)
    return state["step"], state["history"], state["mlflow_run_id"], state.get("initial_val_loss")


STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class TrainingInterrupted(PipelineError):
    """A stop signal ended the run after a checkpoint was saved; the CLI exits with 128 + the signal number."""

    def __init__(self, signum: int, step: int, ckpt_path: Path, rank: int):
        self.signum, self.step, self.ckpt_path, self.rank = signum, step, ckpt_path, rank
        self.signal_name = signal.Signals(signum).name
        super().__init__(f"stopped by {self.signal_name} after step {step}: the checkpoint {ckpt_path} holds "
                         f"step {step}; run the same command with --resume to continue from it")


class StopSignals:
    """While active, SIGTERM and SIGUSR1 only record themselves: the loop stops at the next step boundary.
    Repeated signals change nothing (torchrun forwards SLURM's SIGTERM to workers that got it already). A
    signal the parent ignores stays ignored; outside the main thread (no handlers there) it does nothing."""

    def __init__(self):
        self.signum = 0
        self._previous: dict[int, object] = {}

    def _record(self, signum, frame) -> None:
        self.signum = self.signum or signum

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for s in STOP_SIGNALS:
                if signal.getsignal(s) is not signal.SIG_IGN:
                    self._previous[s] = signal.signal(s, self._record)
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous.clear()

    def agreed(self, d: Dist) -> int:
        """The signal any rank received (0: none); a collective, so every rank stops at the same step."""
        return d.all_max(self.signum)


def check_split_ids(vocab_size: int, cfg: TrainConfig, splits: dict) -> None:
    """Before anything is written: every token id of the data must index the base's embedding (data tokenized
    with another tokenizer than the base's fails here, not as an IndexError mid-run, where its ids go past the base's
    vocabulary; ids that fit it are check_split_tokenizers' to refuse, by the tokenizer tokenize recorded)."""
    from .inputs import check_token_ids

    if cfg.pad_id >= vocab_size:  # it fills packed rows, through the embedding like any token
        raise InputError(f"--pad-id {cfg.pad_id}: not a token id of the base {cfg.base} (vocab_size {vocab_size}); "
                         f"expected an id in [0, {vocab_size})")
    for flag, ds in splits.items():
        if ds is not None and len(ds.tokens):
            path = cfg.train_data if flag == "--train-data" else cfg.val_data
            check_token_ids(int(ds.tokens.max()), vocab_size, path, flag, cfg.base)


def check_split_tokenizers(cfg: TrainConfig) -> tuple[dict | None, str | None]:
    """Before the base is loaded and anything written: the tokenizer that made each split (the vocabulary digest
    tokenize records in its stats.json) must be the base's own (beside it, or inside its GGUF), compared by vocabulary,
    not by file. Ids of another tokenizer that happen to fit the base's vocabulary would pass check_split_ids and
    train on garbage. Returns (the tokenizer the training split records, None where it records none: kept with the
    adapter and in the MLflow run; a warning where the base's tokenizer cannot be read (nothing checked), else
    None)."""
    from .tokenizer import base_tokenizer_path, check_made_with, load_tokenizer

    # A split of no stats.json, or one tokenized before tokenize recorded its tokenizer: trains as before, unchecked.
    made_by = {flag: (path, recorded) for flag, path in (("--train-data", cfg.train_data), ("--val-data", cfg.val_data))
               if path and (recorded := split_tokenizer(path, flag)) is not None}
    trained_with = made_by["--train-data"][1] if "--train-data" in made_by else None
    # A base with no tokenizer beside it (a bare Meta or HF folder) has nothing to compare with: trains as before.
    if not made_by or (source := base_tokenizer_path(cfg.base)) is None:
        return trained_with, None
    try:
        base_tokenizer = load_tokenizer(source)  # once, for both splits
    except (TokenizerError, ImportError) as e:  # e.g. a GGUF of no vocabulary: nothing to compare with either
        return trained_with, f"the splits' tokenizer is not checked against the base's, which cannot be read ({e})"
    source = base_tokenizer.source  # the file, where source is a folder
    for flag, (path, recorded) in made_by.items():
        check_made_with(recorded, base_tokenizer, f"{flag} {path}", "tokenized with",
                        f"the tokenizer of --base {cfg.base}",
                        "its token ids mean other tokens to the base; expected data tokenized with the base's own "
                        f"tokenizer (tokenize again with --tokenizer {source}; in the workflow, config base.tokenizer "
                        "null takes the base's own)")
    return trained_with, None


def train_step(model, train_ds: TokenDataset, idx: np.ndarray, cfg: TrainConfig, d: Dist,
               params: list[torch.nn.Parameter]) -> tuple[float, float, float]:
    """Forward/backward over the step's samples and the gradient all-reduce; (loss, real, padded tokens)."""
    # The same on every rank; read from the loss masks alone (a sample's image is not needed to count).
    n_targets = int(sum(train_ds.sample_loss_mask(int(i))[1:].sum() for i in idx))
    loss_sum = torch.zeros((), dtype=torch.float64, device=d.device)
    real = padded = 0
    for batch, weight in rank_batches(train_ds, idx, cfg, d):
        batch = batch.to(d.device)
        with autocast(d.device):
            loss = token_loss_sum(model, batch) * weight
        (loss / n_targets).backward()
        loss_sum += loss.detach().double()
        real, padded = real + batch.real_tokens * weight, padded + batch.padded_tokens * weight
    for p in params:
        if is_sharded(p):
            continue  # FSDP reduce-scattered its gradient during backward
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        d.all_sum(p.grad)
    stats = d.all_sum(torch.tensor([loss_sum.item(), real, padded], dtype=torch.float64, device=d.device))
    return stats[0].item() / n_targets, stats[1].item(), stats[2].item()


def train(cfg: TrainConfig, resume: bool = False, keep_checkpoint: bool = False) -> dict:
    """Train an adapter; with `resume`, continue from OUT_DIR's checkpoint if there is one. After the last step
    the checkpoint files are removed (so that a rerun trains afresh) unless `keep_checkpoint` (e.g. to continue
    a --max-steps run later). SIGTERM/SIGUSR1 save a checkpoint and raise TrainingInterrupted. Compiled
    (cfg.compile), the compiled code comes from and goes to cfg.compile_cache (compile_cache.py). The run holds
    OUT_DIR from start to end (out_dir_held): a second training of it meanwhile is refused with OutputInUse."""
    from .compile_cache import compile_cache

    d = setup_distributed(cfg)
    with out_dir_held(Path(cfg.out_dir), d), compile_cache(cfg.compile_cache if cfg.compile else None,
                                                           training_kind(cfg)):
        return train_here(cfg, d, resume, keep_checkpoint)


@contextmanager
def out_dir_held(out: Path, d: Dist) -> Iterator[None]:
    """Rank 0 holds `out` (io.hold) while the block runs: it alone writes the folder, and one lock per job is
    what keeps a second job out, on any number of nodes (a lock per node on the shared folder would refuse the
    job's own other nodes; one on node-local disk would keep out no job of another node). Every rank learns
    whether rank 0 got it, so that all the processes of a refused job stop here, before any of them reads the
    folder, and with the same error, on which the command line leaves the folder to the training that holds it.
    Rank 0 failing otherwise as it takes the lock stops them too, rather than leaving them waiting in the
    collective."""
    with ExitStack() as held:
        failed: BaseException | None = None
        if d.rank == 0:
            try:
                held.enter_context(hold(out, "training", "--out-dir"))
            except BaseException as e:  # told to every rank, then raised
                failed = e
        outcome = d.all_max(0 if failed is None else 1 if isinstance(failed, OutputInUse) else 2)
        if failed is not None:
            raise failed
        if outcome == 1:
            raise OutputInUse(f"--out-dir {out} is in use by another training (rank 0's error names it)")
        if outcome == 2:
            raise PipelineError(f"--out-dir {out}: rank 0 could not take its lock (rank 0's error says why)")
        yield


def training_kind(cfg: TrainConfig) -> dict:
    """What decides the code a training compiles (its compile cache's name): the base, what trains, the packed
    rows' shapes, and this process's rank (each compiles for its own device)."""
    return {"command": "train", "base": cfg.base, "method": cfg.method, "adapter": cfg.adapter.to_dict(),
            "lora": cfg.lora.to_dict() if cfg.method == "lora" else None, "images": bool(cfg.image_features),
            "rows": cfg.rows_per_micro_batch, "row_len": cfg.row_len, "fsdp": cfg.fsdp,
            "rank": os.environ.get("RANK", "0"), "world": os.environ.get("WORLD_SIZE", "1")}


def train_here(cfg: TrainConfig, d: Dist, resume: bool, keep_checkpoint: bool) -> dict:
    """train, holding its folder, within its compile cache."""
    out = Path(cfg.out_dir)
    ckpt_path = out / "checkpoint.pt"
    torch.manual_seed(cfg.seed)
    dtype = pick_dtype(d.device)
    cfg.check_settings()  # (the command line has run it before the command started: check_train_options)
    images = ImageFeatures(Path(cfg.image_features)) if cfg.image_features else None
    trained_with, tokenizer_warning = check_split_tokenizers(cfg)
    adapter = replace(cfg.adapter, visual_dim=images.dim) if images else cfg.adapter
    # Projections stay unfused here (fuse_projections is for decoding): measured on an H100 at 7B, the fused
    # weights cost 4% of training throughput and 4 GiB more activation memory (BENCHMARKS.md). Sharded, the model
    # is built on the CPU and each process moves only its shards to its device.
    sharded = cfg.fsdp and d.world > 1
    model = load_for_training(cfg.method, cfg.base, adapter, cfg.lora, "cpu" if sharded else d.device, dtype)
    loaded_base = base_digest(model)  # before float8 or sharding changes how the weights are held
    if cfg.precision == "fp8":
        float8_matmuls(model, d.device, cast_weights=not sharded)
    if sharded:
        model = shard_model(model, cfg.method, d)
    params = [p for p in model.parameters() if p.requires_grad]
    # One fused kernel for the whole update on the GPU instead of a few per parameter tensor.
    opt = torch.optim.AdamW(params, lr=0.0, betas=cfg.betas, weight_decay=cfg.weight_decay,
                            fused=d.device.type == "cuda")
    train_ds = TokenDataset(Path(cfg.train_data), images)
    val_ds = TokenDataset(Path(cfg.val_data), images) if cfg.val_data else None
    if int(train_ds.lengths.max()) > cfg.row_len:
        raise ValueError(f"{cfg.train_data}: longest sample {int(train_ds.lengths.max())} > row_len {cfg.row_len}")
    check_split_ids(model.args.vocab_size, cfg, {"--train-data": train_ds, "--val-data": val_ds})
    for option, ds in (("--train-data", train_ds), ("--val-data", val_ds)):
        if ds is None:
            continue
        ds.require_targets(option)  # a loss over no targets is 0/0: a NaN step, or a NaN validation loss
        if (longest := int(ds.lengths.max())) > model.args.max_seq_len:  # positions the base never saw
            raise ValueError(f"{option} {ds.path}: longest sample {longest} tokens > the {model.args.max_seq_len} "
                             f"positions of --base {cfg.base}; expected samples tokenized to at most that")
    image_samples = None
    if images is not None:  # each split's samples that read an image, and all of them: the rest train from text
        image_samples = {name: {"with_image": ds.samples_with_images(), "samples": len(ds)}
                         for name, ds in (("train", train_ds), ("val", val_ds)) if ds is not None}
        if not image_samples["train"]["with_image"]:
            raise DataError(f"--image-features {cfg.image_features}: none of the {len(train_ds)} samples of "
                            f"--train-data {cfg.train_data} has features there (a cache made of other records?); "
                            "expected the cache encode-images made of the records tokenize read")
    steps_per_epoch = math.ceil(len(train_ds) / cfg.global_batch)
    total_steps = steps_per_epoch * cfg.epochs
    last_step = min(total_steps, cfg.max_steps or total_steps)
    inputs = {"--base": loaded_base, "--train-data": train_ds.digest(),
              "--val-data": val_ds.digest() if val_ds is not None else None,
              "--image-features": images.digest() if images is not None else None}

    found = read_checkpoint(ckpt_path, cfg, inputs, model, opt, announce=d.rank == 0) if resume else None
    if found is not None:
        step, history, run_id, initial_val_loss = restore(found[0], model, opt, d)
        if step > last_step:
            raise ValueError(f"--max-steps {cfg.max_steps}: {found[1]} holds step {step} already; expected more "
                             "steps than that, or no --resume (to train afresh)")
    else:
        step, history, run_id, initial_val_loss = 0, [], None, None
    saved_step = step if found is not None else None  # the step the checkpoint on disk holds, if of this run
    if cfg.compile:
        model.compile_blocks()

    if d.rank == 0:
        # One line per job (its log), not per process; once every input is checked, so that a refused run's
        # stderr is its one-line error alone.
        for warning in (schedule_warning(cfg, steps_per_epoch, step, last_step), tokenizer_warning):
            if warning:
                print(f"llama-adapter train: warning: {warning}", file=sys.stderr, flush=True)
        for name, count in (image_samples or {}).items():
            print(f"llama-adapter train: {count['with_image']} of the {count['samples']} {name} samples read an "
                  "image (the rest, from their text alone)", file=sys.stderr, flush=True)
        out.mkdir(parents=True, exist_ok=True)
        for path in training_outputs(out):  # an earlier run's, which this run's config.json would seem to describe
            remove_output(path)
        write_json(out / TRAINING_CONFIG, asdict(cfg))
    # metrics.jsonl: steps after the checkpoint will be redone; a fresh run drops an earlier run's lines.
    tracker = Tracker(out, cfg.run_name or out.name, "llama_adapter.train", enabled=d.rank == 0, tags=cfg.tags,
                      run_id=run_id, keep_through=step if found is not None else -1)
    bar = None

    def kept() -> str:
        """What a diverged run leaves to resume from."""
        return (f"the last good checkpoint, of step {saved_step}, is left untouched in {ckpt_path}"
                if saved_step is not None else
                f"no checkpoint was written before it (--checkpoint-every {cfg.checkpoint_every})")

    def save(step: int) -> None:
        """Every process gathers (collective under FSDP); rank 0 writes. A trained state holding NaN or infinity is
        not written over the last good checkpoint: the run stops as at a NaN loss (every process: they agree)."""
        nonlocal saved_step
        if found := non_finite_state(model, opt, cfg.method, d):
            raise TrainingDiverged(
                f"step {step} (epoch {max(step - 1, 0) // steps_per_epoch}): the trained state holds NaN or infinity "
                f"under a finite loss and finite gradients: {listed(found)}; "
                + ("the optimizer's update overflowed, at this step or one since the last checkpoint"
                   if step > (saved_step or 0) else "it held them before this run's first step (its starting weights)")
                + f"; not saved as a checkpoint: {kept()}")
        state = checkpoint_state(model, opt, step, history, cfg, tracker.run_id, initial_val_loss, inputs, d)
        if d.rank == 0:
            save_checkpoint(state, ckpt_path, keep_previous=saved_step is not None)
        saved_step = step

    def run_step(step: int) -> int:
        """One optimizer step from `step`, logged; the next step's number."""
        t0 = time.perf_counter()
        idx = step_samples(len(train_ds), cfg, step)
        lr = lr_at(step, steps_per_epoch, cfg)
        for group in opt.param_groups:
            group["lr"] = lr
        loss_value, real, padded = train_step(model, train_ds, idx, cfg, d, params)
        if not math.isfinite(loss_value):
            # numbered as the log's lines (step N/LAST is printed once N steps are done): the step after `step`
            raise TrainingDiverged(
                f"step {step + 1} (epoch {step // steps_per_epoch}): loss {loss_value} on the batch of samples "
                f"{sorted(train_ds.source_index[idx].tolist())} (record indices of the validated data); {kept()}")
        if found := step_unless_non_finite(model, opt, cfg.method, d):
            raise TrainingDiverged(
                f"step {step + 1} (epoch {step // steps_per_epoch}): a gradient holds NaN or infinity under a finite "
                f"loss ({loss_value:.4f}) on the batch of samples {sorted(train_ds.source_index[idx].tolist())} "
                f"(record indices of the validated data): {listed(found)}; the optimizer did not step: {kept()}")
        step += 1
        seconds = time.perf_counter() - t0
        metrics = {"loss": loss_value, "lr": lr, "real_tokens": real, "padded_tokens": padded,
                   "real_tokens_per_s": real / seconds, "epoch": step / steps_per_epoch, **gate_magnitudes(model)}
        if val_ds is not None and (step % steps_per_epoch == 0 or step == last_step):
            metrics["val_loss"] = evaluate_loss(model, val_ds, cfg, d)
        history.append({"step": step, **metrics})
        tracker.log_metrics(metrics, step)
        bar.update(1)
        bar.set_postfix(loss=f"{loss_value:.4f}", tok_s=f"{metrics['real_tokens_per_s']:.0f}")
        if d.rank == 0 and bar.disable:  # no terminal: one plain line per step for the log file
            print(f"step {step}/{last_step} loss {loss_value:.4f} lr {lr:.3e} "
                  f"tokens/s {metrics['real_tokens_per_s']:.0f}" +
                  (f" val_loss {metrics['val_loss']:.4f}" if "val_loss" in metrics else ""), flush=True)
        return step

    # Everything from here to the weights written is inside the run: a failure or a signal anywhere (the first
    # validation pass, the steps, writing the weights) ends the MLflow run FAILED or KILLED, not left open.
    try:
        tracker.log_dataset(Path(cfg.train_data), dataset_name(Path(cfg.train_data)), "training",
                            samples=len(train_ds), tokens=int(train_ds.lengths.sum()))
        if val_ds is not None:
            tracker.log_dataset(Path(cfg.val_data), dataset_name(Path(cfg.val_data)), "validation", samples=len(val_ds),
                                tokens=int(val_ds.lengths.sum()))
        if run_id is None:
            tracker.log_params({"config": asdict(cfg), "model": model.args.to_dict(), **d.layout(),
                                "method": cfg.method,
                                "trainable_parameters": sum(p.numel() for p in params),
                                "data": data_provenance(Path(cfg.train_data)), **tokenizer_param(trained_with)})
        # Params keep the layout a run started on; a resumption (on as many nodes as the scheduler gave it, which may
        # differ) tags the run with the one it continued on.
        tracker.set_tags({f"resumed_{k}" if found is not None else k: str(v) for k, v in d.layout().items()})
        if step == 0 and val_ds is not None and initial_val_loss is None:
            # Before any step: with zero-initialised gates this is the base model's own held-out loss, the
            # reference the adapter's gain is measured from.
            initial_val_loss = evaluate_loss(model, val_ds, cfg, d)
            tracker.log_metrics({"val_loss": initial_val_loss}, 0)
        bar = progress(last_step, step, out.name, enabled=d.rank == 0)
        with StopSignals() as stop:
            while step < last_step:
                if signum := stop.agreed(d):  # a step boundary: all ranks stop here, rank 0 saves
                    if saved_step != step:
                        save(step)
                    stopped = TrainingInterrupted(signum, step, ckpt_path, d.rank)
                    tracker.set_tags({"stopped_by": stopped.signal_name, "checkpoint_step": str(step)})
                    tracker.close(status="KILLED")
                    # The others leave once rank 0 has saved and closed its run (torchrun stops the rest as
                    # soon as one process exits); a signal in the meantime is only recorded.
                    d.all_max(0)
                    raise stopped
                step = run_step(step)
                if step % cfg.checkpoint_every == 0 or step == last_step:
                    save(step)
        result = finish(model, cfg, history, d, tracker, initial_val_loss, image_samples, trained_with)
    except TrainingInterrupted:
        raise
    except STOPS:
        tracker.close(status="KILLED")
        raise
    except BaseException:
        tracker.close(failed=True)
        raise
    finally:
        if bar is not None:
            bar.close()
    # The weights and metrics.json are written: the run is complete. A stop signal from here on is recorded and
    # ignored, not raised: the command line removes a stopped command's outputs, and with the checkpoints gone the
    # whole training would be lost. Ending the MLflow run (a server's calls) comes before the checkpoints go.
    with StopSignals():
        tracker.close()
        if d.rank == 0 and not keep_checkpoint:
            remove_checkpoints(ckpt_path)  # the adapter is written: a rerun trains afresh instead of resuming
    return result


def finish(model: Transformer, cfg: TrainConfig, history: list[dict], d: Dist, tracker: Tracker,
           initial_val_loss: float | None, image_samples: dict | None, tokenizer: dict | None) -> dict:
    """Write the weights and metrics.json, the training's summary: with its MLflow run and tags, it keeps `tokenizer`,
    the one that made the training split (check_split_tokenizers; None where its stats.json records none), which
    generate and evaluate compare with theirs (evaluate.check_trained_tokenizer)."""
    out = Path(cfg.out_dir)
    result = {"method": cfg.method, "weights": WEIGHTS[cfg.method], "steps": len(history),
              "final_loss": history[-1]["loss"] if history else None,
              "initial_val_loss": initial_val_loss, "val_loss": [h["val_loss"] for h in history if "val_loss" in h],
              "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
              **d.layout(), "device": device_name(d.device), "history": history,
              "mlflow_run_id": tracker.run_id, "tags": tracker.tags, "image_samples": image_samples,
              "tokenizer": tokenizer}
    # Sharded weights are gathered whole first (collective: every process takes part).
    whole = get_model_state_dict(model, options=FULL_STATE) if any(map(is_sharded, model.parameters())) else None
    if d.rank == 0:
        weights = save_tuned(model, cfg.method, out, base_model=str(cfg.base), state=whole)
        write_json(out / TRAINING_METRICS, result)
        # Every trained file goes to MLflow too, so a run's weights stay recoverable from its artifacts.
        for path in (weights.parent if cfg.method == "full" else weights,
                     *([out / PEFT_CONFIG] if cfg.method == "lora" else []),
                     out / TRAINING_CONFIG, out / TRAINING_METRICS):
            tracker.log_artifact(path)
    return result


def dataset_name(split_dir: Path) -> str:
    """A token split's name as MLflow shows it: dataset/split (tokenize writes tokens/<dataset>/<split>)."""
    return f"{split_dir.parent.name}/{split_dir.name}"


def data_provenance(split_dir: Path) -> dict:
    """Where a token split came from (the fetch.json recorded by `tokenize` in its stats.json)."""
    stats = split_dir.parent / TOKEN_STATS
    provenance = read_json_object(stats, "tokenize's stats.json").get("provenance", {}) if stats.exists() else {}
    return {"split": str(split_dir), **provenance}
