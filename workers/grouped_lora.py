"""LoRA on projections that read the same input, computed as one group: q/k/v in attention, gate/up in the MLP.

peft runs each LoRA target on its own: per target a dropout copy of the input, ``x @ A.T``, ``@ B.T``, a scale
and an add, forward and backward. With packed rows of about 2,600 tokens (four GPUs, 16 sequences per rank and
step) a compiled layer spends more CPU time launching those small kernels than the GPU spends running them (see
``benchmarks/RESULTS.md``, four-GPU trace). Grouping the targets that share an input cuts the LoRA matrix
products of a layer from 14 to 8 in the forward and from 28 to 16 in the backward:

- the dropout copies of all targets of a group come from one kernel, each with its own mask, as in peft;
- ``A`` of every target in one batched product: ``[targets, tokens, in] @ [targets, in, r]``;
- ``B`` of every target in one product with the block-diagonal of the ``B`` matrices, whose zero blocks add
  exact zeros to the fp32 accumulation, so each target's delta is the one peft computes.

The rotary embedding, the attention function and the LoRA parameters are the model's own; only the order of
launches changes. ``join_base_weights`` goes one step further for the frozen base projections: it lays a group's
weights (and biases) out as one tensor, of which the layers' own weights become views (no memory added), so that
the group's base product is one matrix product too and the LoRA terms are added to it in one kernel: per layer 3
fewer base products forward and 3 fewer backward, as in the fused q/k/v and gate/up projections of inference
engines. Used by the packed training path (``prepare_model_for_packing``) for the
attention and MLP classes below. A group is left to peft when its targets differ in rank, scaling or dropout,
use DoRA or a LoRA bias, or more than one adapter, and when the adapter is merged or disabled. The finetune
worker does not group under ZeRO-3, whose hooks gather a parameter only when its own module is called.
"""
from __future__ import annotations

import sys
import types
from typing import Any, Sequence

import torch
import torch.nn.functional as F

ATTENTION_CLASSES = frozenset({"LlamaAttention", "MistralAttention", "Qwen2Attention"})
MLP_CLASSES = frozenset({"LlamaMLP", "MistralMLP", "Qwen2MLP"})
_CACHE_ARGUMENTS = ("past_key_values", "past_key_value", "cache")


def _adapter(layer: torch.nn.Module) -> str | None:
    """The one active adapter of a peft LoRA Linear that a group can run, else None."""
    if not (hasattr(layer, "lora_A") and isinstance(getattr(layer, "base_layer", None), torch.nn.Linear)):
        return None
    if layer.merged or layer.disable_adapters or len(layer.active_adapters) != 1:
        return None
    adapter = layer.active_adapters[0]
    if adapter not in layer.lora_A or getattr(layer, "fan_in_fan_out", False):
        return None
    if getattr(layer, "use_dora", {}).get(adapter) or getattr(layer, "lora_bias", {}).get(adapter):
        return None
    if not (isinstance(layer.lora_A[adapter], torch.nn.Linear) and isinstance(layer.lora_B[adapter], torch.nn.Linear)
            and layer.lora_A[adapter].bias is None and layer.lora_B[adapter].bias is None):
        return None
    return adapter


def _dropout_p(layer: torch.nn.Module, adapter: str) -> float:
    dropout = layer.lora_dropout[adapter]
    return float(dropout.p) if isinstance(dropout, torch.nn.Dropout) else 0.0


def groupable(layers: Sequence[torch.nn.Module]) -> bool:
    """True when every layer is a peft LoRA Linear on one adapter with the same rank, scaling and dropout."""
    adapters = [_adapter(layer) for layer in layers]
    if adapters[0] is None or any(adapter != adapters[0] for adapter in adapters):
        return False
    adapter = adapters[0]
    first = layers[0]
    shape = (first.lora_A[adapter].weight.shape[0], first.scaling[adapter], _dropout_p(first, adapter))
    return all((layer.lora_A[adapter].weight.shape[0], layer.scaling[adapter], _dropout_p(layer, adapter)) == shape
               for layer in layers)


def dropout_copies(x: torch.Tensor, copies: int, p: float, training: bool) -> torch.Tensor:
    """``[copies, *x.shape]``: ``x`` under ``copies`` independent dropout masks (a view of ``x`` without dropout)."""
    stacked = x.unsqueeze(0).expand(copies, *x.shape)
    return F.dropout(stacked, p, training=True) if training and p > 0 else stacked


def joined_lora_delta(x: torch.Tensor, layers: Sequence[torch.nn.Module]) -> torch.Tensor:
    """``[tokens, sum of out_features]``: each layer's LoRA term ``B(A(dropout(x))) * scaling`` side by side."""
    adapter = layers[0].active_adapters[0]
    first = layers[0]
    flat = x.reshape(-1, x.shape[-1])
    weights_a = [layer.lora_A[adapter].weight for layer in layers]
    if not torch.is_autocast_enabled(flat.device.type):
        flat = flat.to(weights_a[0].dtype)  # peft's upcast of the input to the adapter's dtype
    dropout = first.lora_dropout[adapter]
    p = _dropout_p(first, adapter)
    if dropout.training and p > 0:
        copies = dropout_copies(flat, len(layers), p, training=True)
        low = torch.bmm(copies, torch.stack(weights_a).transpose(1, 2))  # [targets, tokens, r]
        low = low.transpose(0, 1).reshape(flat.shape[0], -1)  # [tokens, targets x r]
    else:
        low = flat @ torch.cat(weights_a).t()
    weights_b = [layer.lora_B[adapter].weight for layer in layers]
    return (low @ torch.block_diag(*weights_b).t()) * first.scaling[adapter]


def lora_deltas(x: torch.Tensor, layers: Sequence[torch.nn.Module]) -> list[torch.Tensor]:
    """Each layer's LoRA term ``B(A(dropout(x))) * scaling`` for an input they share, as one group."""
    sizes = [layer.base_layer.out_features for layer in layers]
    delta = joined_lora_delta(x, layers)
    return [part.reshape(*x.shape[:-1], size) for part, size in zip(delta.split(sizes, dim=-1), sizes)]


def grouped_linear(x: torch.Tensor, layers: Sequence[torch.nn.Module],
                   joined_base: tuple[torch.Tensor, torch.Tensor | None] | None = None) -> list[torch.Tensor]:
    """What ``layer(x)`` returns for each peft LoRA Linear in ``layers`` (see ``groupable``).

    ``joined_base`` is the group's base weight and bias from ``join_base_weights``: one product for the group.
    """
    if joined_base is None:
        outputs = [layer.base_layer(x) for layer in layers]
        return [(output + delta).to(output.dtype) for output, delta in zip(outputs, lora_deltas(x, layers))]
    base = F.linear(x, *joined_base)
    total = (base + joined_lora_delta(x, layers).view(base.shape)).to(base.dtype)
    return list(total.split([layer.base_layer.out_features for layer in layers], dim=-1))


# ---- the group's frozen base weights as one tensor ---------------------------------------------------------

JOINED_BASE = "_prunetune_joined_base"  # (weight, bias or None) on the attention or MLP module


def _joinable(bases: Sequence[torch.nn.Module]) -> bool:
    """Plain frozen Linear layers on one input, device and dtype (not quantized, not sharded, not on meta)."""
    if not all(type(base) is torch.nn.Linear and type(base.weight) is torch.nn.Parameter for base in bases):
        return False
    weights = [base.weight for base in bases]
    if any(weight.requires_grad or weight.is_meta or weight.dim() != 2 for weight in weights):
        return False
    if len({(weight.device, weight.dtype, weight.shape[1]) for weight in weights}) != 1:
        return False
    biases = [base.bias for base in bases]
    if all(bias is None for bias in biases):
        return True
    return all(bias is not None and not bias.requires_grad and bias.dtype == weights[0].dtype for bias in biases)


def join_base_weights(owner: torch.nn.Module) -> bool:
    """Make the base weights (and biases) of ``owner``'s LoRA group views of one tensor; True when joined.

    The parameters stay the same objects (optimizers, DDP and ``state_dict`` see no change), only their storage
    moves. ``owner.to(...)`` and the like join them again on the new device or dtype (see ``_apply_and_join``).
    Weights replaced by assignment afterwards (not in place) are not seen: call this again.
    """
    projections = _group_of(owner)
    bases = [layer.base_layer for layer in projections] if projections and groupable(projections) else []
    if not bases or not _joinable(bases):
        owner.__dict__.pop(JOINED_BASE, None)  # a joined tensor left from before would be stale
        return False
    sizes = [base.out_features for base in bases]
    with torch.no_grad():
        weight = torch.cat([base.weight for base in bases])
        bias = None if bases[0].bias is None else torch.cat([base.bias for base in bases])
        for base, part in zip(bases, weight.split(sizes)):
            base.weight.data = part
        if bias is not None:
            for base, part in zip(bases, bias.split(sizes)):
                base.bias.data = part
    setattr(owner, JOINED_BASE, (weight, bias))
    if "_apply" not in owner.__dict__:
        owner._apply = types.MethodType(_apply_and_join, owner)
    return True


def _still_joined(owner: torch.nn.Module) -> bool:
    weight, bias = owner.__dict__[JOINED_BASE]
    bases = [layer.base_layer for layer in _group_of(owner) or ()]
    tensors = [(base.weight, weight) for base in bases] + [(base.bias, bias) for base in bases if bias is not None]
    return bool(bases) and all(
        part is not None and part.untyped_storage().data_ptr() == whole.untyped_storage().data_ptr()
        for part, whole in tensors)


def _apply_and_join(self: torch.nn.Module, fn: Any, recurse: bool = True) -> torch.nn.Module:
    """``Module._apply`` (behind ``.to``, ``.cuda``, ``.half`` ...) converts each parameter on its own, which
    would leave the joined tensor behind on the old device; join the converted weights again. A conversion that
    changed nothing (DeepSpeed's ``.bfloat16()`` of a bf16 model) keeps the joined tensor as it is."""
    type(self)._apply(self, fn, recurse)
    if recurse and JOINED_BASE in self.__dict__ and not _still_joined(self):
        join_base_weights(self)
    return self


def grouped_attention_forward(self: torch.nn.Module, hidden_states: torch.Tensor,
                              position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
                              attention_mask: torch.Tensor | None = None, *args: Any,
                              **kwargs: Any) -> tuple[torch.Tensor, None]:
    """transformers' Llama/Mistral/Qwen2 attention with q/k/v as one LoRA group; no KV cache (training)."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    projections = (self.q_proj, self.k_proj, self.v_proj)
    if args or position_embeddings is None or any(kwargs.get(name) is not None for name in _CACHE_ARGUMENTS) \
            or self.config._attn_implementation not in ALL_ATTENTION_FUNCTIONS or not groupable(projections):
        return self._prunetune_ungrouped_forward(hidden_states, position_embeddings, attention_mask, *args, **kwargs)
    for name in _CACHE_ARGUMENTS:
        kwargs.pop(name, None)
    input_shape = hidden_states.shape[:-1]
    hidden_shape = (*input_shape, -1, self.head_dim)
    query, key, value = (out.view(hidden_shape).transpose(1, 2)
                         for out in grouped_linear(hidden_states, projections, getattr(self, JOINED_BASE, None)))
    cos, sin = position_embeddings
    query, key = sys.modules[type(self).__module__].apply_rotary_pos_emb(query, key, cos, sin)
    attention = ALL_ATTENTION_FUNCTIONS[self.config._attn_implementation]
    window = getattr(self, "sliding_window", getattr(self.config, "sliding_window", None))
    output, _ = attention(self, query, key, value, attention_mask,
                          dropout=0.0 if not self.training else self.attention_dropout, scaling=self.scaling,
                          **({"sliding_window": window} if window is not None else {}), **kwargs)
    return self.o_proj(output.reshape(*input_shape, -1).contiguous()), None


def grouped_mlp_forward(self: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The gated MLP with gate/up as one LoRA group."""
    projections = (self.gate_proj, self.up_proj)
    if not groupable(projections):
        return self._prunetune_ungrouped_forward(x)
    gate, up = grouped_linear(x, projections, getattr(self, JOINED_BASE, None))
    return self.down_proj(self.act_fn(gate) * up)


def _group_of(module: torch.nn.Module) -> tuple[torch.nn.Module, ...] | None:
    """The projections that share an input in a standard attention (q/k/v) or MLP (gate/up) module, else None."""
    name = type(module).__name__
    if name in ATTENTION_CLASSES and all(hasattr(module, p) for p in ("q_proj", "k_proj", "v_proj")) \
            and hasattr(sys.modules[type(module).__module__], "apply_rotary_pos_emb"):
        return module.q_proj, module.k_proj, module.v_proj
    if name in MLP_CLASSES and all(hasattr(module, p) for p in ("gate_proj", "up_proj", "down_proj")):
        return module.gate_proj, module.up_proj
    return None


def group_lora_projections(model: torch.nn.Module, join_base: bool = False) -> tuple[int, int]:
    """Give the model's standard attention and MLP modules the grouped forwards.

    Returns how many modules run grouped, and of those how many have their base weights joined
    (``join_base``, see ``join_base_weights``). Modules whose class is not listed, whose targets peft must run
    itself (``groupable``), or whose ``forward`` something else already replaced are left alone. Idempotent.
    """
    grouped = joined = 0
    for module in model.modules():
        projections = _group_of(module)
        if projections is None:
            continue
        if "_prunetune_ungrouped_forward" not in module.__dict__:
            if "forward" in module.__dict__ or not groupable(projections):
                continue
            module._prunetune_ungrouped_forward = module.forward
            forward = grouped_attention_forward if type(module).__name__ in ATTENTION_CLASSES else grouped_mlp_forward
            module.forward = types.MethodType(forward, module)
        grouped += 1
        if join_base and (JOINED_BASE in module.__dict__ or join_base_weights(module)):
            joined += 1
    return grouped, joined
