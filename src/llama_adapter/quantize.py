"""Lower-precision frozen bases through torchao: weight-only int8 for inference (--quantize int8), float8
matmuls for training (--precision fp8).

Decoding at small batches reads every weight once per token, so halving the bytes of bf16 weights is what can
make it faster; the activations stay in the model's dtype (weight-only: no calibration, nothing to tune). Two
formats (config.QUANTIZATIONS):
- `int8`: each output row of a weight gets its own scale (torchao's per-row int8), which keeps the error of a
  row independent of the others' magnitudes;
- `int8-g32`: a scale for each 32 inputs of a row (the layout of GGUF's Q8_0), 1/16 more bytes. Weights whose
  rows mix ranges fit it better: SmolLM2's next token, read along ScienceQA text, agrees with fp32's at 98.4% of
  positions with it, as often as bf16's does, and at 96.9% per row (BENCHMARKS.md).

What is quantized: every linear layer of the blocks (wq, wk, wv, wo, w1, w2, w3), about 98% of LLaMA-7B's
weights. What is not:
- the token embedding and the output layer (the LM head): a lookup reads one row per token, not the table, and
  the head's logits decide the greedy token directly, so the head stays in the model's dtype (tied to the
  embedding in SmolLM2, where it is a fifth of the weights);
- the norms (vectors), and the adapter's own tensors: its prompts and gates are fp32 parameters read once per
  decode (the prompts' keys and values go into the KV cache), and a trained adapter is swapped in and out of a
  quantized base as of a bf16 one. The prompts pass through the quantized wk and wv of their layer, as the
  tokens do.
A LoRA is merged into the base's weights before they are quantized (load_for_inference's order).

Training in float8 (`float8_matmuls`) casts each block projection's input and weight to float8 (e4m3), with one
dynamic scale per tensor, and the output gradient to e5m2 for the backward matmul to the input (the frozen
weights once, at load, unless FSDP shards them; the rest at every matmul): torchao's float8 training, its
"tensorwise" recipe, with the weight gradient's matmul (which a frozen weight does not need) left in high
precision. Hopper's float8 tensor cores do those matmuls at twice the bf16 rate. The frozen weights take no
gradient, so the compiled blocks drop the weight-gradient matmul (AOTAutograd keeps only what a gradient that is
asked for needs). Left in the model's dtype: the output layer (its logits decide the loss, and it is one matmul
of 32 per token at 7B), LoRA's wrapped projections (its update reads their input), norms, attention, and the
adapter.
"""

from __future__ import annotations

import logging
from dataclasses import replace

import torch
from torch import Tensor, nn

from .errors import InputError
from .model import Transformer


def import_torchao(option: str):
    """torchao, imported for `option` (named in the error when it is not installed)."""
    try:
        if torch.version.cuda is None:
            # torchao announces each of its CUDA kernels that a CPU-only torch cannot load: noise here
            logging.getLogger("torchao").setLevel(logging.ERROR)
        import torchao.float8
        import torchao.quantization
    except ImportError:
        raise InputError(f"{option} needs torchao, which is not installed: pip install torchao") from None
    return torchao


def int8_group_size(quantize: str) -> int | None:
    """The inputs that share a scale in a --quantize format: `int8-gN` -> N; `int8` (a scale per row) -> None."""
    return int(quantize.removeprefix("int8-g")) if quantize.startswith("int8-g") else None


def int8_weight(weight: Tensor, group_size: int | None = None) -> Tensor:
    """`weight` (out, in) as torchao's weight-only int8 tensor, a scale per row or per `group_size` inputs;
    F.linear takes it as it is. torchao's inductor settings are left alone (set_inductor_config=False): they are
    process-wide and would turn on coordinate-descent tuning, searching all directions, for every later
    compilation in the process; the compiled decode step asks for the tuning it needs itself
    (generate.compiled_block)."""
    quantization = import_torchao("--quantize int8").quantization
    from torchao.quantization.granularity import PerGroup, PerRow

    linear = nn.Linear(weight.size(1), weight.size(0), bias=False, device="meta")
    linear.weight = nn.Parameter(weight.detach(), requires_grad=False)
    granularity = PerRow() if group_size is None else PerGroup(group_size)
    quantization.quantize_(linear, quantization.Int8WeightOnlyConfig(granularity=granularity,
                                                                     set_inductor_config=False))
    return linear.weight


def quantize_int8(model: Transformer, group_size: int | None = None) -> Transformer:
    """Quantize the blocks' linear layers of a frozen model in place, a scale per output row or per `group_size`
    inputs (see the module's docstring for what is left as it was). A fused projection (fuse_projections) is
    quantized as one weight, and its parts become row slices of it, so that the full-precision weights are freed
    and the prompts' keys still read the same int8 wk and wv."""
    widths = {model.args.dim, model.args.hidden_dim, model.args.n_heads * model.args.head_dim}  # the inputs
    if group_size is not None and any(w % group_size for w in widths):
        raise InputError(f"--quantize int8-g{group_size}: a scale per {group_size} inputs needs the blocks' input "
                         f"widths ({', '.join(map(str, sorted(widths)))}) to be multiples of {group_size}, which "
                         "this base's are not; expected --quantize int8 (a scale per row) for it")
    if any(p.requires_grad for name, p in model.named_parameters() if not model.is_added_param(name)):
        raise ValueError("quantize_int8 is for a frozen base: int8 weights take no gradient")
    for layer in model.layers:
        a, f = layer.attention, layer.feed_forward
        for owner, fused, parts in ((a, "wqkv", (a.wq, a.wk, a.wv)), (f, "w13", (f.w1, f.w3))):
            if getattr(owner, fused) is None:
                for linear in parts:
                    linear.weight = nn.Parameter(int8_weight(linear.weight, group_size), requires_grad=False)
                continue
            whole = int8_weight(getattr(owner, fused), group_size)
            setattr(owner, fused, whole)
            at = 0
            for linear in parts:
                n = linear.out_features
                linear.weight = nn.Parameter(whole[at: at + n], requires_grad=False)
                at += n
        for linear in (a.wo, f.w2):
            linear.weight = nn.Parameter(int8_weight(linear.weight, group_size), requires_grad=False)
    return model


def int8_format(model: Transformer) -> str | None:
    """The --quantize format quantize_int8 gave the model's block weights (it quantizes every block's wo), read
    from the weight itself: `int8` (a scale per row), `int8-gN` (per N inputs); None where they are not int8."""
    weights = (model.layers[0].attention.wo.weight, model.layers[0].feed_forward.w2.weight)
    if not hasattr(weights[0], "qdata"):
        return None
    # torchao's block_size: the inputs that share a scale; a group as wide as a row (a small model) says nothing
    groups = {w.block_size[-1] for w in weights if w.block_size[-1] < w.shape[-1]}
    return f"int8-g{min(groups)}" if groups else "int8"


# Hopper (9.0) and Ada (8.9) have float8 tensor cores; torch's float8 matmul refuses older GPUs.
FLOAT8_CAPABILITY = (8, 9)


def float8_matmuls(model: Transformer, device: torch.device, cast_weights: bool = True) -> Transformer:
    """Make the frozen block projections of a model about to train on `device` compute in float8 (see the module's
    docstring), in place; before compile_blocks and before sharding (so the model may still be on the CPU while
    `device`, where its matmuls will run, is a GPU). On the CPU torchao emulates the float8 matmul (tests).

    cast_weights: cast the frozen weights to float8 here, once, instead of at every matmul. A frozen weight's
    scale never changes, so the result is the same; each step no longer reads every bf16 weight twice (its
    absolute maximum, then the cast) in the forward and again in the backward, and the weights take half the
    memory. Not for a base FSDP will shard (False there): its all-gather moves plain tensors, not float8 ones."""
    if device.type == "cuda" and torch.cuda.get_device_capability(device) < FLOAT8_CAPABILITY:
        name, capability = torch.cuda.get_device_name(device), torch.cuda.get_device_capability(device)
        raise InputError(f"--precision fp8 needs a GPU of compute capability {'.'.join(map(str, FLOAT8_CAPABILITY))} "
                         f"or newer (Ada, Hopper and later); {name} is {'.'.join(map(str, capability))}: use "
                         "--precision auto")
    float8 = import_torchao("--precision fp8").float8
    frozen = {id(m) for m in model.layers.modules() if type(m) is nn.Linear and not m.weight.requires_grad}
    if not frozen:
        raise ValueError("float8_matmuls: the blocks have no frozen projection (it is for a frozen base)")
    # The weight gradient's matmul stays out of float8: a frozen weight takes none (the compiled blocks drop it),
    # and in float8 its inner dimension would be the batch's token count, which torch's float8 matmul wants
    # divisible by 16 and a compiled block with dynamic shapes cannot promise.
    tensorwise = float8.Float8LinearConfig.from_recipe_name("tensorwise")
    high = lambda cast: float8.CastConfig(scaling_type=float8.ScalingType.DISABLED,  # noqa: E731
                                          target_dtype=cast.target_dtype)
    # Off a GPU, torchao's emulation: the same float8 values and scales, their product by torch.mm in fp32. torch's
    # own float8 matmul on the CPU is a reference loop (0.14 GFLOP/s on 2 cores with torch 2.13): a training step
    # of SmolLM2-135M did not end in 8 minutes (benchmarks/smollm2_precision.py's CPU smoke check).
    config = replace(tensorwise, cast_config_input_for_grad_weight=high(tensorwise.cast_config_input),
                     cast_config_grad_output_for_grad_weight=high(tensorwise.cast_config_grad_output),
                     emulate=device.type != "cuda")
    float8.convert_to_float8_training(model.layers, config=config,
                                      module_filter_fn=lambda module, name: id(module) in frozen)
    return cast_float8_weights(model) if cast_weights else model


def cast_float8_weights(model: Transformer) -> Transformer:
    """Cast the weights of the blocks' float8 projections (float8_matmuls) to float8 once, as their matmuls would
    cast them (e4m3, one scale per tensor): Float8TrainingTensors, which the forward and backward take as cast."""
    from torchao.float8.float8_linear import Float8Linear
    from torchao.float8.float8_scaling_utils import hp_tensor_to_float8_dynamic
    from torchao.float8.float8_training_tensor import GemmInputRole

    for module in model.layers.modules():
        if type(module) is Float8Linear and not module.weight.requires_grad:
            config = module.config
            weight = hp_tensor_to_float8_dynamic(module.weight.detach(), config.cast_config_weight.target_dtype,
                                                 module.linear_mm_config, gemm_input_role=GemmInputRole.WEIGHT,
                                                 round_scales_to_power_of_2=config.round_scales_to_power_of_2)
            module.weight = nn.Parameter(weight, requires_grad=False)
    return model
