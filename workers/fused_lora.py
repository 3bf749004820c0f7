"""LoRA's dropout and down-projection ``A`` in one Triton kernel each way (packed GPU training path).

peft computes ``lora_B(lora_A(dropout(x))) * scaling`` next to every frozen linear. With ``lora_dropout``
0.05 (the recipe's), ``dropout(x)`` is a new full-size activation plus a mask for each of the seven target
modules of a layer: written in the forward, kept for the backward (it is ``lora_A``'s saved input), read
by the rank-8 matmul and again by its weight gradient, and the input gradient goes back through another
elementwise pass. For a 6.7B model that is memory traffic and kernel launches a sizeable part of a step
spends (see ``benchmarks/RESULTS.md``), and about 0.5 GB of saved activations per layer and 5k tokens.

Here ``h = dropout(x) @ A.T`` is one kernel that reads ``x`` once and draws the mask from a counter-based
generator (Philox, keyed by a per-call seed drawn from torch's generator; one call gives four elements, as in
PyTorch's own dropout kernel: drawing one per element made the kernels compute-bound); the backward kernel draws the same
mask again and writes ``dx`` and ``dA`` reading ``x`` once more. Only ``x`` (shared by q/k/v, by gate/up) and
the seed are saved. The rest of the LoRA branch (``lora_B``, the scaling, the sum) stays peft's.

Same semantics as peft's module: each call draws an independent Bernoulli(1 - p) mask scaled by 1/(1 - p)
in training mode, none in eval mode; the matmuls run in the activation's dtype with fp32 accumulation as
under ``torch.autocast``. The masks come from another generator than ``torch.nn.Dropout``'s, so a run is
not bit-identical to peft's (it is repeatable with the same seed). ``tests/test_fused_lora.py`` checks
outputs and gradients against the unfused computation with Triton's CPU interpreter.

Measured on one H200 (benchmarks/RESULTS.md, 2026-11-28): peak memory 36.3 instead of 48.0 GiB, throughput
unchanged (18,748 tok/s; 18,286 without, in another call). The kernels reach about 1.6 TB/s: the mask's Philox
draws, not memory, bound them.
"""
from __future__ import annotations

import logging
import os
import types
from typing import Any

import torch
import torch.nn.functional as F
from torch.library import triton_op, wrap_triton

log = logging.getLogger(__name__)

RANK_PAD = 16  # tl.dot needs 16 along each dimension; ranks up to 16 fit one tile
# Tiles are small and grids large on purpose: drawing the mask (Philox: chains of dependent integer multiplies)
# needs many warps per SM to hide its latency; 64 x 128 tiles with 4 K-splits ran at ~0.5 TB/s in the real step.
FORWARD_BLOCK_M, FORWARD_BLOCK_K = 32, 128
FORWARD_SPLITS = 8  # the forward splits K so that a few thousand rows still fill the GPU
BACKWARD_BLOCK_M, BACKWARD_BLOCK_K = 32, 64
ROWS_PER_PROGRAM = 256  # backward: rows one program walks, accumulating dA in registers
FORWARD_WARPS = BACKWARD_WARPS = 4

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: everything falls back to peft's computation
    triton = None


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def kernels_usable(x: torch.Tensor) -> bool:
    """Whether the kernels can run on ``x``: CUDA (or Triton's interpreter, for the CPU tests), rows < 2**31."""
    return (triton is not None and (x.is_cuda or _interpreting())
            and x.dtype in (torch.bfloat16, torch.float16, torch.float32) and x.numel() < 2**31)


if triton is not None:
    @triton.jit
    def _keep(seed, rows, first, groups_per_row, p, BM: tl.constexpr, BK: tl.constexpr):
        """The [BM, BK] tile's dropout mask, columns from ``first``: one Philox call draws four columns.

        Element (row, col) gets output ``col % 4`` (in a fixed order) of the call at counter
        ``row * groups_per_row + col // 4``, so the mask does not depend on the tile shape.
        """
        groups = first // 4 + tl.arange(0, BK // 4)
        r0, r1, r2, r3 = tl.randint4x(seed, rows[:, None] * groups_per_row + groups[None, :])
        bits = tl.reshape(tl.join(tl.join(r0, r1), tl.join(r2, r3)), (BM, BK))
        return tl.random.uint_to_uniform_float(bits) >= p

    @triton.jit
    def _down_kernel(x_ptr, w_ptr, out_ptr, seed_ptr, rows_total, width, x_row_stride, split_width, p, scale,
                     RANK: tl.constexpr, PAD: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr,
                     DROPOUT: tl.constexpr, IEEE: tl.constexpr):
        """out[split, rows, :] = dropout(x)[rows, cols of this split] @ A[:, cols].T, in fp32."""
        rows = tl.program_id(0) * BM + tl.arange(0, BM)
        split = tl.program_id(1)
        ranks = tl.arange(0, PAD)
        dtype = x_ptr.dtype.element_ty
        acc = tl.zeros((BM, PAD), dtype=tl.float32)
        seed = tl.load(seed_ptr)
        start = split * split_width
        for step in range(0, split_width // BK):  # the last split may run past width: masked
            cols = start + step * BK + tl.arange(0, BK)
            inside = (rows[:, None] < rows_total) & (cols[None, :] < width)
            x = tl.load(x_ptr + rows[:, None] * x_row_stride + cols[None, :], mask=inside, other=0.0)
            if DROPOUT:
                keep = _keep(seed, rows, start + step * BK, tl.cdiv(width, 4), p, BM, BK)
                x = tl.where(keep, x.to(tl.float32) * scale, 0.0).to(dtype)
            w = tl.load(w_ptr + ranks[None, :] * width + cols[:, None],
                        mask=(ranks[None, :] < RANK) & (cols[:, None] < width), other=0.0).to(dtype)
            if IEEE:
                acc += tl.dot(x, w, input_precision="ieee")
            else:
                acc += tl.dot(x, w)
        tl.store(out_ptr + (split * rows_total + rows[:, None]) * PAD + ranks[None, :], acc,
                 mask=rows[:, None] < rows_total)

    @triton.jit
    def _up_kernel(x_ptr, w_ptr, dh_ptr, dx_ptr, dw_ptr, seed_ptr, rows_total, width, x_row_stride, rows_each,
                   p, scale, RANK: tl.constexpr, PAD: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr,
                   DROPOUT: tl.constexpr, IEEE: tl.constexpr):
        """dx = dropout'(dh @ A) for a [rows_each, BK] block; this block's part of dA = dh.T @ dropout(x)."""
        cols = tl.program_id(1) * BK + tl.arange(0, BK)
        ranks = tl.arange(0, PAD)
        dtype = x_ptr.dtype.element_ty
        w = tl.load(w_ptr + ranks[:, None] * width + cols[None, :],
                    mask=(ranks[:, None] < RANK) & (cols[None, :] < width), other=0.0).to(dtype)
        dw = tl.zeros((PAD, BK), dtype=tl.float32)
        seed = tl.load(seed_ptr)
        start = tl.program_id(0) * rows_each
        for step in range(0, rows_each // BM):  # the last block may run past the rows: masked
            rows = start + step * BM + tl.arange(0, BM)
            inside = (rows[:, None] < rows_total) & (cols[None, :] < width)
            dh = tl.load(dh_ptr + rows[:, None] * RANK + ranks[None, :],
                         mask=(rows[:, None] < rows_total) & (ranks[None, :] < RANK), other=0.0).to(dtype)
            x = tl.load(x_ptr + rows[:, None] * x_row_stride + cols[None, :], mask=inside, other=0.0)
            if IEEE:
                dx = tl.dot(dh, w, input_precision="ieee")
            else:
                dx = tl.dot(dh, w)
            if DROPOUT:
                keep = _keep(seed, rows, tl.program_id(1) * BK, tl.cdiv(width, 4), p, BM, BK)
                # as autograd does it: the gradient rounded to the activation dtype, then times mask * scale
                dx = tl.where(keep, dx.to(dtype).to(tl.float32) * scale, 0.0)
                x = tl.where(keep, x.to(tl.float32) * scale, 0.0).to(dtype)
            tl.store(dx_ptr + rows[:, None] * width + cols[None, :], dx.to(dtype), mask=inside)
            if IEEE:
                dw += tl.dot(tl.trans(dh), x, input_precision="ieee")
            else:
                dw += tl.dot(tl.trans(dh), x)
        tl.store(dw_ptr + (tl.program_id(0) * PAD + ranks[:, None]) * width + cols[None, :], dw,
                 mask=(ranks[:, None] < RANK) & (cols[None, :] < width))


def _rows(x: torch.Tensor) -> torch.Tensor:
    rows = x.reshape(-1, x.shape[-1])
    return rows if rows.stride(-1) == 1 else rows.contiguous()


def _forward(x: torch.Tensor, weight: torch.Tensor, seed: torch.Tensor, p: float) -> torch.Tensor:
    rows = _rows(x)
    total, width = rows.shape
    rank = weight.shape[0]
    split_width = triton.cdiv(triton.cdiv(width, FORWARD_SPLITS), FORWARD_BLOCK_K) * FORWARD_BLOCK_K
    splits = triton.cdiv(width, split_width)
    partial = torch.empty((splits, total, RANK_PAD), dtype=torch.float32, device=x.device)
    grid = (triton.cdiv(total, FORWARD_BLOCK_M), splits)
    wrap_triton(_down_kernel)[grid](rows, weight.contiguous(), partial, seed, total, width, rows.stride(0), split_width,
                       float(p), 1.0 / (1.0 - p), RANK=rank, PAD=RANK_PAD, BM=FORWARD_BLOCK_M,
                       BK=FORWARD_BLOCK_K, DROPOUT=p > 0, IEEE=x.dtype == torch.float32, num_warps=FORWARD_WARPS)
    return partial[:, :, :rank].sum(0).to(x.dtype).reshape(*x.shape[:-1], rank)


def _backward(grad_h: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, seed: torch.Tensor,
              p: float) -> tuple[torch.Tensor, torch.Tensor]:
    rows = _rows(x)
    total, width = rows.shape
    rank = weight.shape[0]
    dh = grad_h.reshape(total, rank).to(x.dtype).contiguous()
    dx = torch.empty((total, width), dtype=x.dtype, device=x.device)
    blocks = triton.cdiv(total, ROWS_PER_PROGRAM)
    partial = torch.empty((blocks, RANK_PAD, width), dtype=torch.float32, device=x.device)
    grid = (blocks, triton.cdiv(width, BACKWARD_BLOCK_K))
    wrap_triton(_up_kernel)[grid](rows, weight.contiguous(), dh, dx, partial, seed, total, width, rows.stride(0),
                     ROWS_PER_PROGRAM, float(p), 1.0 / (1.0 - p), RANK=rank, PAD=RANK_PAD, BM=BACKWARD_BLOCK_M,
                     BK=BACKWARD_BLOCK_K, DROPOUT=p > 0, IEEE=x.dtype == torch.float32, num_warps=BACKWARD_WARPS)
    grad_weight = partial[:, :rank].sum(0).to(weight.dtype)
    return dx.reshape(x.shape), grad_weight


@triton_op("prunetune::lora_down", mutates_args=())
def lora_down(x: torch.Tensor, weight: torch.Tensor, p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(dropout(x, p) @ weight.T, seed)``: the seed the mask was drawn with, for the backward."""
    seed = torch.randint(0, 2**31 - 1, (1,), dtype=torch.int64, device=x.device)
    return _forward(x, weight, seed, p), seed


@lora_down.register_fake
def _(x, weight, p):
    return x.new_empty((*x.shape[:-1], weight.shape[0])), x.new_empty((1,), dtype=torch.int64)


@triton_op("prunetune::lora_down_backward", mutates_args=())
def lora_down_backward(grad_h: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, seed: torch.Tensor,
                       p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(dx, dweight)`` of ``lora_down`` for the mask drawn with ``seed``."""
    return _backward(grad_h, x, weight, seed, p)


@lora_down_backward.register_fake
def _(grad_h, x, weight, seed, p):
    return x.new_empty(x.shape), weight.new_empty(weight.shape)


def _setup(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
    x, weight, p = inputs
    ctx.save_for_backward(x, weight, output[1])
    ctx.p = p


def _lora_down_grad(ctx: Any, grad_h: torch.Tensor, _grad_seed: Any) -> tuple[Any, ...]:
    x, weight, seed = ctx.saved_tensors
    dx, dweight = lora_down_backward(grad_h, x, weight, seed, ctx.p)
    return (dx if ctx.needs_input_grad[0] else None), (dweight if ctx.needs_input_grad[1] else None), None


lora_down.register_autograd(_lora_down_grad, setup_context=_setup)


def _fused_down_forward(self: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """``forward`` of a LoRA ``A`` linear that applies its layer's dropout itself, in one kernel when it can."""
    # an int attribute: torch.compile keeps it a constant (a float attribute would become a graph input)
    p = self.prunetune_dropout_ppm / 1e6 if self.training else 0.0
    usable = kernels_usable(x) and (x.is_cuda or not torch.compiler.is_compiling())  # the interpreter runs eagerly only
    if usable and (p > 0 or torch.is_grad_enabled()):
        return lora_down(x, self.weight, p)[0]
    return F.linear(F.dropout(x, p) if p > 0 else x, self.weight)


def fuse_lora_dropout(model: torch.nn.Module) -> int:
    """Fold each LoRA layer's dropout into its ``lora_A`` (``lora_A.forward`` runs the kernels); returns how many.

    Only vanilla LoRA linears qualify: rank <= 16, no bias on ``A``, a plain ``Dropout`` (or none). Parameters
    and state-dict keys are untouched, so saving and loading the adapter are peft's. Idempotent.
    """
    if triton is None:
        return 0
    fused = 0
    for module in model.modules():
        if not (hasattr(module, "lora_A") and hasattr(module, "lora_dropout")) or getattr(module, "lora_variant", None):
            continue
        for name, down in module.lora_A.items():
            dropout = module.lora_dropout[name]
            if "forward" in down.__dict__:
                fused += 1  # done already
                continue
            if not (isinstance(down, torch.nn.Linear) and down.bias is None and down.out_features <= RANK_PAD
                    and isinstance(dropout, (torch.nn.Dropout, torch.nn.Identity))):
                continue
            down.prunetune_dropout_ppm = round(1e6 * dropout.p) if isinstance(dropout, torch.nn.Dropout) else 0
            down.forward = types.MethodType(_fused_down_forward, down)
            module.lora_dropout[name] = torch.nn.Identity()
            fused += 1
    return fused
