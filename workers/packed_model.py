"""The model side of padding-free LoRA training (see ``workers/packing.py`` for the data side).

- ``linear_cross_entropy``: the LM head and cross-entropy in chunks, so the fp32 logits of a 128k
  vocabulary never exist all at once, computed only at positions that have a target.
- Variable-length attention registered in transformers' AttentionInterface: flash-attention's varlen
  kernel that ships inside PyTorch on CUDA; an SDPA block-diagonal mask elsewhere (CPU tests).
- ``prepare_model_for_packing``: wires both into a peft-wrapped causal LM, runs LoRA targets that share an
  input as groups (``workers/grouped_lora.py``) and optionally compiles each decoder layer (regional
  ``torch.compile``: one compile serves all layers).

Loss normalisation is described in ``workers/packing.py``.
"""
from __future__ import annotations

import logging
import types
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from workers.grouped_lora import group_lora_projections
from workers.packing import IGNORE_INDEX

log = logging.getLogger(__name__)

ATTENTION_NAME = "prunetune_varlen"  # our entry in transformers' AttentionInterface
JOIN_BASE_WEIGHTS = True  # prepare_model_for_packing's default; benchmarks/finetune_worker_gpu.py compares both

# ---- chunked linear + cross-entropy ---------------------------------------------------------------

def _chunk_loss_and_grad(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, scale: torch.Tensor,
                         need_grad: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Summed cross-entropy of one chunk (times ``scale``) and its gradient w.r.t. ``hidden``; -100 targets add 0.

    Logits are computed in the weight's precision and upcast to fp32, as transformers' loss does.
    """
    logits = (hidden @ weight.t()).float()
    lse = torch.logsumexp(logits, dim=-1)
    # -100 targets count zero: fixed-shape callers (CUDA graphs) pass every position instead of finding them
    weights = (targets != IGNORE_INDEX).to(torch.float32) * scale
    targets = targets.clamp_min(0)
    picked = logits.gather(1, targets[:, None]).squeeze(1)
    loss = ((lse - picked) * weights).sum()
    if not need_grad:
        return loss, None
    probs = torch.exp(logits - lse[:, None])
    probs.scatter_add_(1, targets[:, None], torch.full_like(picked[:, None], -1.0))
    grad = (probs * weights[:, None]).to(weight.dtype) @ weight
    return loss, grad


_compiled_chunk = None


def _chunk_fn(compiled: bool):
    global _compiled_chunk
    if not compiled:
        return _chunk_loss_and_grad
    if _compiled_chunk is None:
        _compiled_chunk = torch.compile(_chunk_loss_and_grad, dynamic=True)
    return _compiled_chunk


class _LinearCrossEntropy(torch.autograd.Function):
    """Loss and input gradient in one pass over vocabulary chunks; the (frozen) weight gets no gradient."""

    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, scale: float,
                chunk_size: int, compiled: bool) -> torch.Tensor:
        fn = _chunk_fn(compiled)
        need_grad = hidden.requires_grad
        loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad = torch.empty_like(hidden) if need_grad else None
        # a device tensor: no recompile per value, and no host-to-device copy that would wait for the GPU
        scale_t = (scale.to(device=hidden.device, dtype=torch.float32) if torch.is_tensor(scale)
                   else hidden.new_full((), scale, dtype=torch.float32))
        with torch.autocast(device_type=hidden.device.type, enabled=False):
            for start in range(0, hidden.shape[0], chunk_size):
                part = slice(start, start + chunk_size)
                chunk_loss, chunk_grad = fn(hidden[part].to(weight.dtype), weight, targets[part], scale_t, need_grad)
                loss += chunk_loss
                if grad is not None:
                    grad[part] = chunk_grad
        ctx.save_for_backward(grad)
        return loss

    @staticmethod
    def backward(ctx: Any, grad_loss: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        (grad,) = ctx.saved_tensors
        grad_hidden = None if grad is None else grad * grad_loss.to(grad.dtype)
        return grad_hidden, None, None, None, None, None


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                         scale: float | torch.Tensor = 1.0, chunk_size: int = 4096, compiled: bool = False,
                         target_positions: torch.Tensor | None = None,
                         all_positions: bool = False) -> tuple[torch.Tensor, int]:
    """Causal-LM loss ``sum(CE(hidden[t] @ weight.T, labels[t+1])) * scale`` and the number of targets.

    ``hidden`` is [batch, tokens, dim] (the decoder's final normed output), ``labels`` [batch, tokens] with
    -100 where nothing is predicted. Only positions with a target go through the head, ``chunk_size`` rows
    at a time, so peak extra memory is ``chunk_size x vocab`` fp32 values instead of ``tokens x vocab``.
    The gradient w.r.t. ``hidden`` is computed during the forward pass (the head is frozen under LoRA), so
    backward costs nothing more. ``target_positions`` (indices into the flattened ``[batch * (tokens - 1)]``
    positions, as ``PackingCollator`` gives them) saves the device sync of finding them here.
    ``all_positions`` sends every position through the head, those without a target adding zero: shapes that
    depend only on the token count (what a CUDA graph needs). The head then does about 60% more work on
    alpaca-like rows, where 61% of the tokens are targets. The returned count is then the number of positions.
    """
    targets = labels[:, 1:].reshape(-1)
    rows = hidden[:, :-1].reshape(-1, hidden.shape[-1])
    if all_positions:
        loss = _LinearCrossEntropy.apply(rows, weight, targets, scale, chunk_size, compiled)
        return loss, int(targets.numel())
    if target_positions is None:
        keep = (targets != IGNORE_INDEX).nonzero().squeeze(1)
    else:
        keep = target_positions.to(device=hidden.device, dtype=torch.long)
    count = int(keep.numel())
    if count == 0:
        return hidden.sum() * 0.0, 0
    loss = _LinearCrossEntropy.apply(rows.index_select(0, keep), weight, targets.index_select(0, keep), scale,
                                     chunk_size, compiled)
    return loss, count


# ---- variable-length attention --------------------------------------------------------------------

def _flash_available() -> bool:
    return torch.cuda.is_available() and hasattr(torch.ops.aten, "_flash_attention_forward")


if hasattr(torch, "library") and hasattr(torch.library, "custom_op"):
    @torch.library.custom_op("prunetune::varlen_attn", mutates_args=())
    def _varlen_attn(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, cu_seqlens: torch.Tensor,
                     max_length: int, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
        out, lse = torch.ops.aten._flash_attention_forward(
            query, key, value, cu_seqlens, cu_seqlens, max_length, max_length, 0.0, True, False, scale=scale)[:2]
        return out, lse

    @_varlen_attn.register_fake
    def _(query, key, value, cu_seqlens, max_length, scale):
        return torch.empty_like(query), query.new_empty((query.shape[1], query.shape[0]), dtype=torch.float32)

    @torch.library.custom_op("prunetune::varlen_attn_backward", mutates_args=())
    def _varlen_attn_backward(grad_out: torch.Tensor, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                              out: torch.Tensor, lse: torch.Tensor, cu_seqlens: torch.Tensor, max_length: int,
                              scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        seed = torch.zeros((2,), dtype=torch.uint64, device=query.device)  # read only with dropout > 0
        offset = torch.empty(0, device=query.device)
        dq, dk, dv = torch.ops.aten._flash_attention_backward(
            grad_out.contiguous(), query, key, value, out, lse, cu_seqlens, cu_seqlens, max_length, max_length,
            0.0, True, seed, offset, scale=scale)
        return dq, dk, dv

    @_varlen_attn_backward.register_fake
    def _(grad_out, query, key, value, out, lse, cu_seqlens, max_length, scale):
        return torch.empty_like(query), torch.empty_like(key), torch.empty_like(value)

    def _setup(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
        query, key, value, cu_seqlens, max_length, scale = inputs
        out, lse = output
        ctx.save_for_backward(query, key, value, out, lse, cu_seqlens)
        ctx.max_length, ctx.scale = max_length, scale

    def _backward(ctx: Any, grad_out: torch.Tensor, grad_lse: torch.Tensor) -> tuple[Any, ...]:
        query, key, value, out, lse, cu_seqlens = ctx.saved_tensors
        dq, dk, dv = _varlen_attn_backward(grad_out, query, key, value, out, lse, cu_seqlens, ctx.max_length,
                                           ctx.scale)
        return dq, dk, dv, None, None, None

    _varlen_attn.register_autograd(_backward, setup_context=_setup)
else:  # pragma: no cover - torch < 2.4
    _varlen_attn = None

_FLASH_GQA: bool | None = None  # learned on first use: whether the varlen kernel takes fewer KV heads


def probe_flash_gqa(device: torch.device) -> bool:
    """Whether the varlen kernel takes fewer KV heads than query heads (forward and backward); cached."""
    global _FLASH_GQA
    if _FLASH_GQA is None:
        try:
            q = torch.randn(16, 4, 64, device=device, dtype=torch.bfloat16, requires_grad=True)
            kv = torch.randn(16, 2, 64, device=device, dtype=torch.bfloat16, requires_grad=True)
            cu = torch.tensor([0, 9, 16], dtype=torch.int32, device=device)
            _varlen_attn(q, kv, kv, cu, 16, 0.125)[0].sum().backward()
            _FLASH_GQA = True
        except RuntimeError as error:
            log.info("varlen flash attention takes no GQA here (%s); repeating KV heads", error)
            _FLASH_GQA = False
    return _FLASH_GQA


def _flash_varlen(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, cu_seqlens: torch.Tensor,
                  max_length: int, scale: float) -> torch.Tensor:
    groups = query.shape[1] // key.shape[1]
    if groups > 1 and not probe_flash_gqa(query.device):
        key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    return _varlen_attn(query, key, value, cu_seqlens, max_length, scale)[0]


def _block_causal_sdpa(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, cu_seqlens: torch.Tensor,
                       scale: float) -> torch.Tensor:
    """Reference path (CPU, fp32): SDPA with a block-diagonal causal mask, [tokens, heads, dim] layout."""
    tokens = query.shape[0]
    groups = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    segment = torch.searchsorted(cu_seqlens[1:].to(torch.long), torch.arange(tokens, device=query.device),
                                 right=True)
    position = torch.arange(tokens, device=query.device)
    mask = (segment[:, None] == segment[None, :]) & (position[:, None] >= position[None, :])
    out = F.scaled_dot_product_attention(query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1),
                                         attn_mask=mask, scale=scale)
    return out.transpose(0, 1)


def varlen_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                             attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                             **kwargs: Any) -> tuple[torch.Tensor, None]:
    """transformers attention function for packed rows: ``query`` [1, heads, tokens, dim] -> [1, tokens, heads, dim].

    Sequence boundaries come from ``cu_seq_lens_q`` (the collator's); without them the row is one causal
    sequence. Flash-attention's varlen kernel (inside PyTorch) on CUDA in bf16/fp16, else SDPA with a
    block-diagonal causal mask.
    """
    if query.shape[0] != 1:
        raise ValueError(f"packed attention expects one packed row per micro-batch, got batch size {query.shape[0]}; "
                         "use PackingCollator")
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    tokens = query.shape[2]
    cu_seqlens = kwargs.get("cu_seq_lens_q")
    if cu_seqlens is None:
        cu_seqlens = torch.tensor([0, tokens], dtype=torch.int32, device=query.device)
        max_length = tokens
    else:
        cu_seqlens = cu_seqlens.to(device=query.device, dtype=torch.int32)
        max_length = int(kwargs.get("max_length_q") or tokens)
    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))  # [tokens, heads, dim]
    if q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and _varlen_attn is not None and _flash_available():
        out = _flash_varlen(q.contiguous(), k.contiguous(), v.contiguous(), cu_seqlens, max_length, scale)
    else:
        out = _block_causal_sdpa(q, k, v, cu_seqlens, scale)
    return out.unsqueeze(0), None


def register_varlen_attention() -> str:
    """Register ``varlen_attention_forward`` with transformers (no mask is built for it); returns its name."""
    from transformers import AttentionInterface
    AttentionInterface.register(ATTENTION_NAME, varlen_attention_forward)
    return ATTENTION_NAME


# ---- model set-up ---------------------------------------------------------------------------------

def causal_lm(model: torch.nn.Module) -> torch.nn.Module:
    """The ``*ForCausalLM`` inside a peft wrapper (LoRA layers are injected in place, so it holds them)."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    if not hasattr(inner, "get_decoder") or inner.get_output_embeddings() is None:
        raise ValueError(f"{type(inner).__name__} is not a causal LM with a decoder and an output head")
    return inner


def packed_causal_lm_forward(self: torch.nn.Module, input_ids: torch.Tensor | None = None,
                             labels: torch.Tensor | None = None, num_items_in_batch: Any = None,
                             **kwargs: Any) -> Any:
    """Replacement ``forward`` for a causal LM: packed batches with labels get the chunked loss.

    Anything else (no labels, or no ``cu_seq_lens_q``) goes to the model's own forward, which then sees
    one row as one sequence: padded batches of several rows are refused by the attention, so evaluation
    batches must be packed too (``group_in_order``). The returned output carries the loss and no logits.
    """
    target_positions = kwargs.pop("target_positions", None)
    if labels is None or kwargs.get("cu_seq_lens_q") is None:
        return self._prunetune_original_forward(input_ids=input_ids, labels=labels,
                                                **({} if num_items_in_batch is None else
                                                   {"num_items_in_batch": num_items_in_batch}), **kwargs)
    from transformers.modeling_outputs import CausalLMOutputWithPast
    for unused in ("attention_mask", "return_dict", "use_cache", "output_attentions", "output_hidden_states",
                   "logits_to_keep"):
        kwargs.pop(unused, None)
    outputs = self.get_decoder()(input_ids=input_ids, use_cache=False, **kwargs)
    hidden = outputs[0]
    settings = self._prunetune_loss
    # 1 / (target count): a device tensor stays on the device (reading it would make the CPU wait for the GPU)
    if torch.is_tensor(num_items_in_batch):
        scale = 1.0 / num_items_in_batch.sum().to(torch.float32).clamp_min(1)
    elif num_items_in_batch is not None:
        scale = 1.0 / max(float(num_items_in_batch), 1.0)
    elif target_positions is not None:
        scale = 1.0 / max(int(target_positions.numel()), 1)
    else:
        scale = 1.0 / (labels[:, 1:] != IGNORE_INDEX).sum().to(torch.float32).clamp_min(1)
    loss, _ = linear_cross_entropy(hidden, self.get_output_embeddings().weight, labels, scale=scale,
                                   chunk_size=settings["chunk_size"], compiled=settings["compiled"],
                                   target_positions=target_positions,
                                   all_positions=settings.get("all_positions", False))
    return CausalLMOutputWithPast(loss=loss)


def _embeddings_need_grad(module: torch.nn.Module, inputs: Any, output: torch.Tensor) -> torch.Tensor:
    if torch.is_grad_enabled() and not output.requires_grad:
        output.requires_grad_()
    return output


def one_graph_for_all_layers(lm: torch.nn.Module) -> None:
    """Make the (frozen) embeddings' output ask for a gradient while training, as every later layer's input does.

    Compiled code is specialised on whether its inputs need a gradient, so layer 0 would otherwise compile a
    training graph of its own (forward and backward) beside the one the other layers share. The price is the
    gradient of layer 0's q/k/v input, one matrix product of about 0.2% of a step's FLOPs at the 6.72B shape.
    Under ``torch.no_grad`` (evaluation) nothing changes. Idempotent.
    """
    embeddings = lm.get_input_embeddings()
    if embeddings is not None and not getattr(embeddings, "_prunetune_needs_grad", False):
        embeddings.register_forward_hook(_embeddings_need_grad)
        embeddings._prunetune_needs_grad = True


def layer_shape_count(model: torch.nn.Module) -> int:
    """How many distinct parameter shapes the decoder's layers have. Structured pruning narrows layers, and
    compiled code is specialised on its parameters' shapes: each distinct shape is one more compile."""
    layers = causal_lm(model).get_decoder().layers
    return len({tuple((name, tuple(param.shape)) for name, param in layer.named_parameters()) for layer in layers})


@dataclass(frozen=True)
class PackingSetup:
    """What ``prepare_model_for_packing`` turned on, for the run's records."""

    attention: str  # "flash-varlen" (CUDA) or "sdpa-block-mask" (fallback)
    compiled_layers: int
    loss: str
    grouped_lora_modules: int = 0  # attention and MLP modules running their LoRA targets as groups
    joined_base_modules: int = 0  # of those, the ones whose group's base weights are one tensor
    layer_shapes: int = 1  # distinct decoder-layer shapes (pruning); compiled layers compile once per shape


def prepare_model_for_packing(model: torch.nn.Module, compile_layers: bool = False, chunk_size: int = 4096,
                              compile_loss: bool | None = None, lora_inputs_in_autocast: bool = True,
                              group_lora: bool = True, join_base: bool | None = None,
                              compile_backend: Any = "inductor") -> PackingSetup:
    """Set ``model`` (peft-wrapped or plain causal LM) up for batches from ``PackingCollator``.

    - attention: our variable-length function (transformers then builds no mask);
    - loss: the causal LM's ``forward`` computes ``linear_cross_entropy`` for packed batches;
    - ``compile_layers``: ``torch.compile`` each decoder layer with dynamic shapes (one compile serves
      all layers, since they share code; packed micro-batches vary in length; layer 0 included, see
      ``one_graph_for_all_layers``); ``compile_backend`` is torch.compile's ``backend`` for them;
    - ``lora_inputs_in_autocast``: LoRA layers take their input as it comes (bf16) instead of peft's copy
      upcast to the fp32 adapter dtype; under ``torch.autocast`` (the Trainer's ``bf16=True``) the LoRA
      matmuls run in bf16 either way, so only the copy (time and saved memory) goes away. Switch it off
      when training reduced-precision weights without autocast.
    - ``group_lora``: LoRA targets that share an input (q/k/v, gate/up) run as one group
      (``workers/grouped_lora.py``): the same terms, fewer kernel launches. Turn it off under
      ZeRO-3, whose hooks gather a parameter only when its own module is called.
    - ``join_base`` (default ``JOIN_BASE_WEIGHTS``): with ``group_lora``, each group's frozen base weights
      become views of one tensor, so the group's base projection is one matrix product (``join_base_weights``).
    Call after ``get_peft_model`` and before the optimizer or Trainer is built. Idempotent.
    """
    lm = causal_lm(model)
    name = register_varlen_attention()
    if hasattr(lm, "set_attn_implementation"):
        try:
            lm.set_attn_implementation(name)
        except (ValueError, ImportError) as error:  # older transformers check names against their own list
            log.debug("set_attn_implementation refused %s (%s); setting the config directly", name, error)
            lm.config._attn_implementation = name
    else:
        lm.config._attn_implementation = name
    lm.config.use_cache = False
    compile_loss = compile_layers if compile_loss is None else compile_loss
    lm._prunetune_loss = {"chunk_size": chunk_size, "compiled": bool(compile_loss)}
    if not hasattr(lm, "_prunetune_original_forward"):
        lm._prunetune_original_forward = lm.forward
        lm.forward = types.MethodType(packed_causal_lm_forward, lm)
    if lora_inputs_in_autocast:
        for module in lm.modules():
            if hasattr(module, "lora_A") and hasattr(module, "_cast_input_dtype"):
                module.cast_input_dtype_enabled = False
    join_base = JOIN_BASE_WEIGHTS if join_base is None else join_base
    grouped, joined = group_lora_projections(lm, join_base=join_base) if group_lora else (0, 0)
    device = next(lm.parameters()).device
    if device.type == "cuda" and _flash_available():
        probe_flash_gqa(device)  # decided here, outside compiled code
    compiled = 0
    if compile_layers:
        import torch._dynamo
        layers = lm.get_decoder().layers
        # layers share code, so one graph serves them all; room in case guards tell some apart
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 2 * len(layers))
        one_graph_for_all_layers(lm)
        for layer in layers:
            layer.compile(dynamic=True, backend=compile_backend)
            compiled += 1
    on_cuda = next(lm.parameters()).is_cuda and _flash_available()
    return PackingSetup(attention="flash-varlen" if on_cuda else "sdpa-block-mask", compiled_layers=compiled,
                        loss=f"chunked linear cross-entropy, {chunk_size} rows a chunk"
                             + (", compiled" if compile_loss else ""), grouped_lora_modules=grouped,
                        joined_base_modules=joined, layer_shapes=layer_shape_count(lm))
