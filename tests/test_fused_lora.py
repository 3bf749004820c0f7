"""The fused LoRA dropout + ``A`` kernels (workers/fused_lora.py) compute what peft's modules compute.

The kernels are Triton. Without a GPU they run in Triton's interpreter (``TRITON_INTERPRET=1``, set here before
the module is imported), so the same kernel code the GPU runs is checked, in fp32 against plain PyTorch; on a
GPU machine the same tests run the compiled kernels on CUDA (fp32 matmuls in IEEE precision).
"""
from __future__ import annotations

import copy
import os

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # before workers.fused_lora defines its kernels

import pytest  # noqa: E402

from tests.test_packing import assert_close_grads, items, lora_grads, lora_model, packed_step, padded_step  # noqa: E402,F401
from tests.test_packing import tokenizer  # noqa: E402,F401
from workers.fused_lora import fuse_lora_dropout, lora_down  # noqa: E402
from workers.packed_model import prepare_model_for_packing  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def mask_of(dx: torch.Tensor, grad_h: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The kept positions, read back from dx = (grad_h @ A) * mask / (1 - p)."""
    return ((dx != 0) | ((grad_h @ weight) == 0)).to(dx.dtype)


@pytest.mark.parametrize("tokens,width,rank", [(70, 300, 8), (1030, 140, 5)])
def test_kernels_match_a_plain_matmul_without_dropout(tokens, width, rank):
    torch.manual_seed(0)
    x = torch.randn(1, tokens, width, device=DEVICE, requires_grad=True)
    weight = torch.randn(rank, width, device=DEVICE, requires_grad=True)
    h, _ = lora_down(x, weight, 0.0)
    grad_h = torch.randn_like(h)
    dx, dweight = torch.autograd.grad(h, (x, weight), grad_h)
    want = x @ weight.t()
    want_dx, want_dweight = torch.autograd.grad(want, (x, weight), grad_h)
    torch.testing.assert_close(h, want, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(dx, want_dx, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(dweight, want_dweight, rtol=1e-5, atol=1e-3)


def test_forward_and_backward_use_one_mask_at_the_dropout_rate():
    torch.manual_seed(0)
    p = 0.3
    x = torch.randn(1, 130, 257, device=DEVICE, requires_grad=True)
    weight = torch.randn(8, 257, device=DEVICE, requires_grad=True)
    h, _ = lora_down(x, weight, p)
    grad_h = torch.randn_like(h)
    dx, dweight = torch.autograd.grad(h, (x, weight), grad_h)
    mask = mask_of(dx, grad_h, weight)
    assert mask.mean().item() == pytest.approx(1 - p, abs=0.02)  # 33k draws: the standard error is 0.0025
    kept = x.detach() * mask / (1 - p)
    torch.testing.assert_close(h, kept @ weight.t(), rtol=1e-5, atol=1e-4)  # the backward's mask is the forward's
    torch.testing.assert_close(dx, (grad_h @ weight) * mask / (1 - p), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(dweight, grad_h.reshape(-1, 8).t() @ kept.reshape(-1, 257), rtol=1e-5, atol=1e-3)


def test_each_call_draws_a_new_mask_and_a_seed_repeats_it():
    x = torch.randn(64, 128, device=DEVICE, requires_grad=True)
    weight = torch.randn(8, 128, device=DEVICE)
    grad_h = torch.randn(64, 8, device=DEVICE)

    def mask() -> torch.Tensor:
        h, _ = lora_down(x, weight, 0.5)
        return mask_of(torch.autograd.grad(h, x, grad_h)[0], grad_h, weight)

    torch.manual_seed(1)
    first, second = mask(), mask()
    torch.manual_seed(1)
    assert not torch.equal(first, second)  # q, k and v see the same input: their masks must differ
    assert torch.equal(mask(), first)


def test_fused_model_matches_peft_and_keeps_its_adapter_keys(tokenizer, items):
    batch = {key: torch.tensor([value], device=DEVICE) for key, value in items[1].items()}
    peft_model = lora_model(len(tokenizer), device=DEVICE, dropout=0.05)
    fused_model = copy.deepcopy(peft_model)
    assert fuse_lora_dropout(fused_model) == 14  # 7 targets x 2 layers
    assert fused_model.state_dict().keys() == peft_model.state_dict().keys()
    for model in (peft_model, fused_model):
        model.eval()  # no dropout: both compute the same function
        model(**batch).loss.backward()
    assert_close_grads(lora_grads(fused_model), lora_grads(peft_model), rtol=1e-5)
    fused_model.train()
    fused_model.zero_grad()
    fused_model(**batch).loss.backward()
    grads = lora_grads(fused_model)
    assert len(grads) == 28 and all(grad.abs().sum() > 0 for grad in grads.values())
    assert not torch.equal(grads["base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight"],
                           lora_grads(peft_model)["base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight"])


@pytest.mark.parametrize("compile_layers", [False, True])
def test_packed_path_with_fused_lora_matches_padded(tokenizer, items, compile_layers):
    """The packed training path with the kernels (compiled layers call them as an opaque op) vs the recipe."""
    padded_model = lora_model(len(tokenizer), device=DEVICE)
    packed_model = copy.deepcopy(padded_model)
    setup = prepare_model_for_packing(packed_model, compile_layers=compile_layers, chunk_size=7, fuse_lora=True)
    assert setup.fused_lora_modules == 14
    want_loss, want_grads = padded_step(padded_model, tokenizer, [items[:4], items[4:]], DEVICE)
    got_loss, got_grads = packed_step(packed_model, [items[:2], items[2:]], device=DEVICE)
    assert got_loss == pytest.approx(want_loss, rel=1e-5)
    assert_close_grads(got_grads, want_grads, rtol=1e-4)
