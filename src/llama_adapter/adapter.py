"""LLaMA-Adapter (Zhang et al. 2023, Sec. 3) as a small change to LLaMA's attention (model.py).

The model owns one table of adaption prompts, `adapter_query` (adapter_layers, adapter_len, dim), and one gate
per head and adapted layer, `adapter_gate` (adapter_layers, n_heads). Layer l of the top `adapter_layers` reads
its prompts through its own frozen wk/wv (no norm, no RoPE), gives them a softmax of their own, scales the
result by tanh(gate) and adds it to the ordinary attention output. Gates start at zero, so a fresh adapter
leaves the model unchanged. A multimodal adapter adds `adapter_visual`, which projects image features.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import AdapterArgs, ModelArgs
from .model import Attention, Transformer, TransformerBlock, plain_tensors


def is_adapter_param(name: str) -> bool:
    """The one predicate that decides what trains and what an adapter file holds."""
    return name.startswith("adapter_")


def gate_scale(gate: Tensor, dtype: torch.dtype) -> Tensor:
    """tanh of a layer's gates (nh,), shaped to scale (B, nh, T, hs) tensors head by head: (1, nh, 1, 1)."""
    return gate.tanh().to(dtype).view(1, -1, 1, 1)


class AdaptedAttention(Attention):
    def __init__(self, args: ModelArgs):
        super().__init__(args)
        # While decoding (setup_kv_cache to clear_kv_cache): the prompts' keys and gated values (1, nh, L, hs),
        # which do not change, computed once, so that no decoded token reads wk and wv twice nor runs the gate's
        # and GQA's small kernels again; and the batch's image values wv(I) (N+1, nkv, hs) of a multimodal
        # adapter, computed at the prefill.
        self.prompt_kv: tuple[Tensor, Tensor] | None = None
        self.image_cache: Tensor | None = None

    def forward(self, x: Tensor, rope: Tensor, input_pos: Tensor, mask: Tensor | None,
                cu_seqlens: Tensor | None = None, max_seqlen: int = 0,
                prompt: Tensor | None = None, gate: Tensor | None = None, image: tuple | None = None) -> Tensor:
        q, k, v = self.project(x, rope)
        y = self.attend(q, k, v, input_pos, mask, cu_seqlens, max_seqlen)  # (B, nh, T, hs)
        if prompt is not None:
            y = y + self.prompt_attention(q, prompt, gate, image)
        return self.out(y)

    def prompt_keys_values(self, prompt: Tensor, gate: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """Each head's keys and gated values (1, nh, L, hs) of a layer's prompts (L, dim) through its frozen
        wk/wv (no norm, no RoPE: prompts have no position), the values scaled by tanh(gate) (nh,)."""
        prompt = prompt.to(dtype)
        L = prompt.size(0)
        pk = self.wk(prompt).view(1, L, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (1, nkv, L, hs)
        pv = self.wv(prompt).view(1, L, self.n_kv_heads, self.head_dim).transpose(1, 2)
        # tanh(gate) scales each head's prompt values rather than its output: the same product, but the gate's
        # gradient then comes from the values' (nh x L x hs), not from a reduction over every token (measured
        # 10 ms of a 380 ms 7B step on an H200). Each head gets its own values, so the keys are repeated per head
        # too (GQA's sharing; L = 10 rows, nothing to save).
        return self.per_head(pk, dim=1), gate_scale(gate, dtype) * self.per_head(pv, dim=1)

    def per_head(self, t: Tensor, dim: int) -> Tensor:
        """A key/value-head tensor repeated along `dim` for the query heads that share each head (GQA)."""
        groups = self.n_heads // self.n_kv_heads
        return t.repeat_interleave(groups, dim=dim) if groups > 1 else t

    def prompt_attention(self, q: Tensor, prompt: Tensor, gate: Tensor,
                         image: tuple[Tensor, Tensor] | None = None) -> Tensor:
        """tanh(gate) · softmax(q Kp^T / sqrt(hs)) Vp over this layer's prompts: (B, nh, T, hs).

        image: (projected image features (N+1, dim), last row zero; the row of each token (B, T), -1 for
        none). The paper adds a token's image to every prompt, P + repeat(I). That shifts every prompt key
        by wk(I), the same for all L prompts, which their softmax cancels; and every prompt value by wv(I),
        which the softmax weights (summing to 1) pass on whole. So the image adds wv(I) to the prompt
        attention's output, exactly, without a prompt tensor per sample in packed batches."""
        pk, pv = self.prompt_kv if self.prompt_kv is not None else self.prompt_keys_values(prompt, gate, q.dtype)
        B = q.size(0)
        # A softmax of their own over the L prompt positions, every query sees every prompt (no mask).
        y = F.scaled_dot_product_attention(q, pk.expand(B, -1, -1, -1), pv.expand(B, -1, -1, -1))
        if image is not None:
            projected, row = image
            iv = self.image_values(projected, q.dtype)[row]  # (B, T, nkv, hs)
            y = y + gate_scale(gate, q.dtype) * self.per_head(iv, dim=2).transpose(1, 2)
        return y

    def image_values(self, projected: Tensor, dtype) -> Tensor:
        """wv of each projected image (N+1, nkv, hs); while decoding, those of the prefill are reused."""
        if self.image_cache is not None:
            return self.image_cache
        values = self.wv(projected.to(dtype)).view(-1, self.n_kv_heads, self.head_dim)
        if self.kv_cache is not None:
            self.image_cache = values
        return values


class AdaptedBlock(TransformerBlock):
    attention_class = AdaptedAttention


class AdaptedTransformer(Transformer):
    """LLaMA that holds an adapter, or none: without one it computes exactly LLaMA (the same weights, names and
    checkpoints), so one loaded base can take adapters in turn (`set_adapter`, checkpoint.apply_adapter)."""

    block_class = AdaptedBlock

    def __init__(self, args: ModelArgs, adapter: AdapterArgs | None = None):
        super().__init__(args)
        self.adapter: AdapterArgs | None = None
        # while decoding: what the prompt keys and values were computed from, where a DecodeGraphs keeps them
        self.prompt_kv_made: PromptInputs | None = None
        self.set_adapter(adapter)

    def is_added_param(self, name: str) -> bool:
        return is_adapter_param(name)

    def set_adapter(self, adapter: AdapterArgs | None, device: torch.device | str | None = None) -> None:
        """Give the model a fresh adapter of this configuration (or none), replacing any it had. With an
        adapter the base is frozen: only `is_adapter_param` parameters train."""
        for name in ("adapter_query", "adapter_gate", "adapter_visual"):
            if hasattr(self, name):
                delattr(self, name)
        self.clear_kv_cache()  # its prompt keys and values were the old adapter's
        self.adapter = adapter
        if adapter is not None:
            adapter.validate_for(self.args)
            self.reset_adapter(device)
        for name, p in self.named_parameters():
            p.requires_grad_(adapter is None or is_adapter_param(name))

    def reset_adapter(self, device: torch.device | str | None = None, generator: torch.Generator | None = None):
        """(Re)create the adapter parameters (new_adapter)."""
        for name, part in self.new_adapter(self.adapter, device, generator).items():
            setattr(self, name, part)

    def new_adapter(self, a: AdapterArgs, device: torch.device | str | None = None,
                    generator: torch.Generator | None = None) -> dict[str, nn.Parameter | nn.Module]:
        """Fresh adapter parameters of configuration `a` for this model, by attribute name, in fp32, as the paper
        initialises them: prompts ~ N(0, 1) (the released code's nn.Embedding default), gates zero (or N(0, 1)
        for the random-init ablation). `device` defaults to where the base weights are."""
        device = device if device is not None else self.tok_embeddings.weight.device
        query = torch.randn(a.adapter_layers, a.adapter_len, self.args.dim, device=device, generator=generator)
        gate_shape = (a.adapter_layers, self.args.n_heads)
        if a.gate_init == "zero":
            gate = torch.zeros(gate_shape, device=device)
        else:
            gate = torch.randn(gate_shape, device=device, generator=generator)
        parts = {"adapter_query": nn.Parameter(query),  # (adapter_layers, adapter_len, dim)
                 "adapter_gate": nn.Parameter(gate)}  # (adapter_layers, n_heads)
        if a.visual_dim:  # image features -> model dim (fp32, PyTorch's default init; the zero gates hide it)
            with torch.device(device):
                parts["adapter_visual"] = nn.Sequential(nn.Linear(a.visual_dim, a.visual_hidden), nn.GELU(),
                                                        nn.Linear(a.visual_hidden, self.args.dim))
        return parts

    def adapter_shapes(self, adapter: AdapterArgs) -> dict[str, torch.Size]:
        """The shape of each tensor (by state-dict name) of an adapter of this configuration on this model, which
        is left as it is: what a trained adapter's file must hold to go in (checkpoint.read_fitting_adapter)."""
        adapter.validate_for(self.args)
        shapes = {}
        for name, part in self.new_adapter(adapter, "meta").items():
            tensors = part.state_dict().items() if isinstance(part, nn.Module) else [("", part)]
            shapes |= {f"{name}.{k}" if k else name: t.shape for k, t in tensors}
        return shapes

    def first_adapted_layer(self) -> int:
        return self.args.n_layers - (self.adapter.adapter_layers if self.adapter else 0)

    def adapter_state_dict(self) -> dict[str, Tensor]:
        return {k: v for k, v in self.state_dict().items() if is_adapter_param(k)}

    def layer_inputs(self, image_features: Tensor | None = None, image_index: Tensor | None = None) -> list[tuple]:
        """(prompt, gate, image) for each adapted layer, nothing for the others.

        image_features: (N, visual_dim) cached features of the batch's images, for a multimodal adapter;
        image_index: (B, T) which of them each token's sample shows, -1 for none (prompts unchanged).
        """
        image = None
        if image_features is not None:
            if not (self.adapter and self.adapter.visual_dim):
                raise ValueError("image features were given but the adapter is text-only (visual_dim 0)")
            projected = self.adapter_visual(image_features.float())  # (N, dim): I_p, one per image
            image = (torch.cat([projected, projected.new_zeros(1, projected.size(1))]), image_index)  # -1: zero row
        first = self.first_adapted_layer()
        return [() if i < first else (self.adapter_query[i - first], self.adapter_gate[i - first], image)
                for i in range(len(self.layers))]

    @torch.no_grad()
    def setup_kv_cache(self, batch: int, max_len: int, keep: bool = False) -> None:
        """KV caches for decoding, holding the adapter's prompt keys and gated values (set up again after the
        adapter or its gates change); keep: as Transformer's, and prompt values of the same shape are refilled in
        place, or left as they are where they still hold what they would be refilled with (`prompt_kv_made`, which
        generate.DecodeGraphs keeps beside them): computing them runs the 7B adapter's 30 layers' wk and wv
        eagerly, most of setup_kv_cache's 5 ms a call bf16 and 12 ms int8 (whose eager products convert each weight
        to bf16 first; H100, BENCHMARKS.md)."""
        super().setup_kv_cache(batch, max_len, keep)
        dtype, first = self.tok_embeddings.weight.dtype, self.first_adapted_layer()
        made, self.prompt_kv_made = self.prompt_kv_made, None
        for layer in self.layers:
            layer.attention.image_cache = None  # the next prefill's images
        if keep and made is not None and first < len(self.layers) and made.hold(self):  # an adapter, as it was
            self.prompt_kv_made = made
            return
        for i, layer in enumerate(self.layers):
            a = layer.attention
            fresh = (a.prompt_keys_values(self.adapter_query[i - first], self.adapter_gate[i - first], dtype)
                     if i >= first else None)
            if keep and fresh is not None and a.prompt_kv is not None and all(
                    (old.shape, old.dtype, old.device) == (new.shape, new.dtype, new.device)
                    for old, new in zip(a.prompt_kv, fresh)):
                for old, new in zip(a.prompt_kv, fresh):  # in place: a captured decode step reads these
                    old.copy_(new)
            else:
                a.prompt_kv = fresh
        if keep and first < len(self.layers):
            self.prompt_kv_made = PromptInputs(self)

    def clear_kv_cache(self) -> None:
        super().clear_kv_cache()
        self.prompt_kv_made = None
        for layer in self.layers:
            layer.attention.prompt_kv = layer.attention.image_cache = None


class PromptInputs:
    """What a model's prompt keys and values were computed from, kept beside them (generate.DecodeGraphs, which
    frees it with them) to tell whether they still hold what they would be computed anew:
    - a copy of the adapter's prompts and gates, and of any trainable tensor of wk and wv (a LoRA's), compared by
      value (small, and an optimizer may write them without counting a version: AdamW(fused=True));
    - the adapted layers' wk and wv modules, and every tensor they hold, compared as the same modules and tensors
      at the same address and version (large: a frozen base keeps them so unless a module or tensor is replaced
      or moved, or written in place; while kept, the old storages are held, so no new tensor takes their address).
    The dtype and device need no check: a kept call's caches, and so its prompt values, are the model's dtype and
    device (DecodeGraphs.lend frees them otherwise). Not seen: an in-place write to a frozen wk/wv tensor through
    `.data` (which counts versions of its own) and a module's non-tensor attributes (a LoRA's scaling); after such
    a change, decode in a new DecodeGraphs block. Inference tensors count no versions: a base made under
    inference_mode is never vouched for, its prompt values computed at every call."""

    def __init__(self, model: AdaptedTransformer):
        self.base, trained = self.base_state(model)
        self.values = ([] if self.base is None  # never vouched for: nothing to compare
                       else [x.detach().clone() for x in (model.adapter_query, model.adapter_gate, *trained)])

    @staticmethod
    def base_state(model: AdaptedTransformer) -> tuple[list[tuple] | None, list[Tensor]]:
        """(object, what may change in place) for each adapted layer's wk and wv (their training flag) and each
        plain tensor they hold (its address and version), None where one is an inference tensor; and those of
        the tensors that are trainable."""
        state, trained = [], []
        for layer in model.layers[model.first_adapted_layer():]:
            for module in (layer.attention.wk, layer.attention.wv):
                tensors = [x for t in (*module.parameters(), *module.buffers()) for x in plain_tensors(t)]
                if any(x.is_inference() for x in tensors):
                    return None, []
                state += [(module, module.training)] + [(x, (x.data_ptr(), x._version)) for x in tensors]
                trained += [x for x in tensors if x.requires_grad]
        return state, trained

    def hold(self, model: AdaptedTransformer) -> bool:
        """Whether the model's inputs to its prompt keys and values are still these."""
        if self.base is None:
            return False
        base, trained = self.base_state(model)
        values = (model.adapter_query, model.adapter_gate, *trained)
        return (base is not None and len(base) == len(self.base)
                and all(was is now and kept == seen for (was, kept), (now, seen) in zip(self.base, base))
                and len(values) == len(self.values)
                and all((kept.shape, kept.dtype, kept.device) == (now.shape, now.dtype, now.device)
                        and torch.equal(kept, now) for kept, now in zip(self.values, values)))
