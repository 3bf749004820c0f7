"""Packed LoRA training computes what the padded recipe computes: same loss, same LoRA gradients.

CPU tests use the SDPA block-mask attention in fp32; the ``gpu`` tests check the flash varlen kernel and
the compiled layers in bf16 against the padded path (run them on the GPU machine).
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model
from transformers import DataCollatorForSeq2Seq, LlamaConfig, LlamaForCausalLM

from jobs.config import LORA_TARGETS
from tests.tiny_assets import build_tiny_tokenizer
from workers.packed_model import causal_lm, linear_cross_entropy, prepare_model_for_packing
from workers.packing import (IGNORE_INDEX, PackedStepSampler, PackingCollator, balance_by_tokens, group_in_order,
                             micro_batches_for_budget, plan_steps)
from workers.prompts import tokenize_example

pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")

EXAMPLES = [
    {"instruction": "Add the two numbers and give the sum.", "input": "one two", "output": "three"},
    {"instruction": "Name the colour of the sky.", "input": "", "output": "The sky is blue while the sun shines."},
    {"instruction": "Repeat the word.", "input": "fox", "output": "fox fox"},
    {"instruction": "Translate this sentence.", "input": "The cat sleeps.", "output": "Le chat dort au soleil."},
    {"instruction": "What is the capital of France?", "input": "", "output": "Paris is the capital of France."},
]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return build_tiny_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def items(tokenizer):
    return [tokenize_example(example, tokenizer, cutoff_len=64, train_on_inputs=False, add_eos_token=True)
            for example in EXAMPLES]


def lora_model(vocab: int, dtype: torch.dtype = torch.float32, device: str = "cpu", dropout: float = 0.0,
               attn: str = "sdpa") -> torch.nn.Module:
    """A 2-layer GQA Llama with LoRA on every recipe target; LoRA B made non-zero so A gets gradients too."""
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=vocab, max_position_embeddings=256,
                         attn_implementation=attn)
    base = LlamaForCausalLM(config).to(device=device, dtype=dtype)
    model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, lora_dropout=dropout,
                                            target_modules=list(LORA_TARGETS), task_type="CAUSAL_LM"))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05)
    return model


def lora_grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: param.grad.detach().clone() for name, param in model.named_parameters() if param.grad is not None}


def padded_step(model, tokenizer, micro_batches, device="cpu"):
    """The recipe's path: padded micro-batches, the model's own loss, token mean over the whole step."""
    collate = DataCollatorForSeq2Seq(tokenizer, pad_to_multiple_of=8, return_tensors="pt", padding=True)
    batches = [collate(group) for group in micro_batches]
    total = sum(int((batch["labels"][:, 1:] != IGNORE_INDEX).sum()) for batch in batches)
    loss_sum = 0.0
    for batch in batches:
        batch = {key: value.to(device) for key, value in batch.items()}
        loss = model(**batch, num_items_in_batch=torch.tensor(total, device=device)).loss
        loss.backward()
        loss_sum += float(loss.detach())
    return loss_sum, lora_grads(model)


def packed_step(model, micro_batches, max_length=64, device="cpu"):
    collate = PackingCollator(max_length=max_length)
    batches = [collate(group) for group in micro_batches]
    total = sum(int((batch["labels"][:, 1:] != IGNORE_INDEX).sum()) for batch in batches)
    loss_sum = 0.0
    for batch in batches:
        batch = {key: value.to(device) if torch.is_tensor(value) else value for key, value in batch.items()}
        loss = model(**batch, num_items_in_batch=total).loss
        loss.backward()
        loss_sum += float(loss.detach())
    return loss_sum, lora_grads(model)


def assert_close_grads(got: dict, want: dict, rtol: float) -> None:
    assert got.keys() == want.keys() and got
    for name in want:
        error = (got[name] - want[name]).norm() / want[name].norm().clamp_min(1e-12)
        assert error < rtol, f"{name}: relative error {error:.2e}"


def test_collator_restarts_positions_and_masks_sequence_starts():
    batch = PackingCollator(max_length=8, pad_to_multiple_of=8)(
        [{"input_ids": [5, 6, 7], "labels": [5, 6, 7]}, {"input_ids": [8, 9], "labels": [-100, 9]}])
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9, 0, 0, 0]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0, 1, 2]]
    assert batch["labels"].tolist() == [[-100, 6, 7, -100, 9, -100, -100, -100]]
    assert batch["cu_seq_lens_q"].tolist() == [0, 3, 5, 8]
    assert batch["target_positions"].tolist() == [0, 1, 3]  # position t predicts label t + 1
    with pytest.raises(ValueError, match="max_length"):
        PackingCollator(max_length=2)([{"input_ids": [1, 2, 3]}])
    # filler longer than max_length comes in pieces the attention kernel's bound covers
    batch = PackingCollator(max_length=4, pad_to_multiple_of=8)([{"input_ids": [5, 6, 7]}])
    assert batch["cu_seq_lens_q"].tolist() == [0, 3, 7, 8]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1, 2, 3, 0]]


def test_collator_pads_to_fixed_shapes_for_cuda_graphs():
    """Filler up to the multiple, in segments no longer than max_length; empty segments up to a fixed count."""
    batch = PackingCollator(max_length=4, pad_to_multiple_of=8, segments=5)([{"input_ids": [5, 6, 7]}])
    assert batch["input_ids"].tolist() == [[5, 6, 7, 0, 0, 0, 0, 0]]
    assert batch["cu_seq_lens_q"].tolist() == [0, 3, 7, 8, 8, 8]  # 4 + 1 filler tokens, then 2 empty segments
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1, 2, 3, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7] + [-100] * 5]
    with pytest.raises(ValueError, match="segments=1"):
        PackingCollator(max_length=4, segments=1)([{"input_ids": [1]}, {"input_ids": [2]}])


def test_packed_loss_and_lora_grads_match_padded(tokenizer, items):
    """Same 5 sequences, recipe-style 2 padded micro-batches vs 2 packed ones split differently."""
    padded_model = lora_model(len(tokenizer))
    packed_model = copy.deepcopy(padded_model)
    prepare_model_for_packing(packed_model, chunk_size=7)  # small chunks: several per micro-batch
    want_loss, want_grads = padded_step(padded_model, tokenizer, [items[:4], items[4:]])
    got_loss, got_grads = packed_step(packed_model, [items[:2], items[2:]])
    assert got_loss == pytest.approx(want_loss, rel=1e-5)
    assert_close_grads(got_grads, want_grads, rtol=1e-4)


def graph_recorder() -> tuple[list, object]:
    """A torch.compile backend that runs each graph as traced (no Inductor) and keeps it in the list."""
    graphs = []

    def backend(graph, example_inputs):
        graphs.append(graph)
        return graph.forward

    return graphs, backend


def test_compiled_layers_share_one_training_graph_layer_0_included(tokenizer, items):
    """The embeddings' output asks for a gradient, so layer 0 needs no training graph of its own (a compile
    the worker pays at every start), and the LoRA gradients stay what the padded path computes."""
    graphs, backend = graph_recorder()
    padded_model = lora_model(len(tokenizer))
    packed_model = copy.deepcopy(padded_model)
    torch._dynamo.reset()
    prepare_model_for_packing(packed_model, compile_layers=True, compile_loss=False, compile_backend=backend)
    want_loss, want_grads = padded_step(padded_model, tokenizer, [items[:4], items[4:]])
    got_loss, got_grads = packed_step(packed_model, [items[:2], items[2:]])
    assert len(graphs) == 1
    assert got_loss == pytest.approx(want_loss, rel=1e-5)
    assert_close_grads(got_grads, want_grads, rtol=1e-4)
    packed_model.eval()
    with torch.no_grad():  # evaluation: one graph more, the same for every layer, and no gradient asked for
        batch = PackingCollator(max_length=64)(items[:2])
        hidden = causal_lm(packed_model).get_input_embeddings()(batch["input_ids"])
        assert not hidden.requires_grad
        packed_model(**batch)
    assert len(graphs) == 2


def test_each_pruned_layer_shape_compiles_apart(tokenizer, items):
    """Structured pruning leaves layers of different widths, and compiled code is specialised on its parameters'
    shapes: one training graph per distinct shape (finetune.compile=auto stops compiling past a few)."""
    graphs, backend = graph_recorder()
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=len(tokenizer), max_position_embeddings=256)
    base = LlamaForCausalLM(config)
    mlp = base.model.layers[2].mlp  # the last layer's MLP pruned to 80 channels
    mlp.gate_proj, mlp.up_proj, mlp.down_proj = (torch.nn.Linear(64, 80, bias=False),
                                                 torch.nn.Linear(64, 80, bias=False), torch.nn.Linear(80, 64, bias=False))
    model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules=list(LORA_TARGETS),
                                            task_type="CAUSAL_LM"))
    torch._dynamo.reset()
    setup = prepare_model_for_packing(model, compile_layers=True, compile_loss=False, compile_backend=backend)
    assert setup.layer_shapes == 2
    packed_step(model, [items])
    assert len(graphs) == 2


def test_packed_forward_falls_back_for_unpacked_batches(tokenizer, items):
    model = lora_model(len(tokenizer))
    prepare_model_for_packing(model)
    single = {key: torch.tensor([value]) for key, value in items[0].items()}
    out = model(**single)
    assert out.logits.shape[1] == len(items[0]["input_ids"]) and out.loss is not None


def test_no_attention_across_sequences(tokenizer, items):
    model = lora_model(len(tokenizer))
    prepare_model_for_packing(model)
    decoder = causal_lm(model).get_decoder()
    collate = PackingCollator(max_length=64)

    def hidden(group):
        batch = collate(group)
        return decoder(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                       cu_seq_lens_q=batch["cu_seq_lens_q"], cu_seq_lens_k=batch["cu_seq_lens_k"],
                       max_length_q=64, max_length_k=64)[0][0], batch["cu_seq_lens_q"].tolist()

    base, bounds = hidden(items[:3])
    changed = dict(items[1], input_ids=[(token + 7) % len(tokenizer) for token in items[1]["input_ids"]])
    other, _ = hidden([items[0], changed, items[2]])
    first, second, third = (slice(bounds[i], bounds[i + 1]) for i in range(3))
    torch.testing.assert_close(other[first], base[first])
    torch.testing.assert_close(other[third], base[third])  # a later sequence cannot see an earlier one
    assert not torch.allclose(other[second], base[second])
    alone, _ = hidden([items[2]])  # and it is exactly what the sequence gives on its own
    torch.testing.assert_close(base[third], alone, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("all_positions", [False, True], ids=["target-positions", "all-positions"])
def test_linear_cross_entropy_matches_reference(all_positions):
    torch.manual_seed(1)
    hidden = torch.randn(2, 9, 16, requires_grad=True)
    weight = torch.randn(50, 16)
    labels = torch.randint(0, 50, (2, 9))
    labels[0, :4] = IGNORE_INDEX
    labels[1, 6] = IGNORE_INDEX
    loss, count = linear_cross_entropy(hidden, weight, labels, scale=0.25, chunk_size=3, all_positions=all_positions)
    loss.backward()
    ref_hidden = hidden.detach().clone().requires_grad_()
    logits = ref_hidden[:, :-1] @ weight.t()
    ref = F.cross_entropy(logits.reshape(-1, 50), labels[:, 1:].reshape(-1), reduction="sum") * 0.25
    ref.backward()
    assert count == (16 if all_positions else int((labels[:, 1:] != IGNORE_INDEX).sum()))
    assert float(loss.detach()) == pytest.approx(float(ref.detach()), rel=1e-6)
    torch.testing.assert_close(hidden.grad, ref_hidden.grad)


def test_steps_keep_64_sequences_and_balance_tokens():
    lengths = [(17 * i) % 250 + 6 for i in range(1000)]
    steps = plan_steps(lengths, sequences_per_step=64, world_size=2, micro_batches=3, seed=42)
    assert len(steps) == 16  # 15 full steps and the 40 left over, enough to fill all 6 micro-batches
    seen = []
    for number, step in enumerate(steps):
        assert len(step) == 6 and sum(len(group) for group in step) == (64 if number < 15 else 40)
        loads = [sum(lengths[i] for i in group) for group in step]
        assert max(loads) - min(loads) <= max(lengths)
        seen += [i for group in step for i in group]
    assert len(seen) == len(set(seen))
    sampler = PackedStepSampler(lengths, 64, world_size=2, micro_batches=3, seed=42)
    assert len(list(sampler)) == len(sampler)
    assert list(sampler)[:6] == steps[0]
    sampler.set_epoch(1)
    assert list(sampler)[:6] != steps[0]


def test_last_partial_step_is_kept_when_it_fills_every_micro_batch():
    lengths = [10] * 70
    steps = plan_steps(lengths, 64, world_size=2, micro_batches=2, seed=0)
    assert [sum(len(g) for g in step) for step in steps] == [64, 6]
    assert len(PackedStepSampler(lengths, 64, 2, 2)) == 8
    assert [sum(len(g) for g in step) for step in plan_steps([10] * 66, 64, 2, 2, 0)] == [64]


def test_micro_batches_for_budget_fits_every_step():
    lengths = [(31 * i) % 256 + 1 for i in range(640)]
    micro = micro_batches_for_budget(lengths, 64, world_size=1, max_tokens=4096, seed=3)
    for step in plan_steps(lengths, 64, 1, micro, seed=3):
        assert all(sum(lengths[i] for i in group) <= 4096 for group in step)
    assert micro == 1 or any(sum(lengths[i] for i in group) > 4096
                             for step in plan_steps(lengths, 64, 1, micro - 1, seed=3) for group in step)
    assert balance_by_tokens([5, 1, 1, 3], [0, 1, 2, 3], 2) == [[0], [1, 2, 3]]


def test_group_in_order_keeps_order_within_budget():
    assert group_in_order([3, 4, 2, 5, 1], max_tokens=7) == [[0, 1], [2, 3], [4]]
    with pytest.raises(ValueError, match="max_tokens"):
        group_in_order([9], max_tokens=8)


needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.gpu
@needs_gpu
def test_flash_varlen_matches_block_mask_reference():
    from workers.packed_model import _block_causal_sdpa, _flash_varlen
    torch.manual_seed(0)
    cu = torch.tensor([0, 5, 130, 131, 300], dtype=torch.int32, device="cuda")
    q = torch.randn(300, 8, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(300, 2, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(300, 2, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    out = _flash_varlen(q, k, v, cu, 256, 0.125)
    grad = torch.randn_like(out)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), grad)
    q32, k32, v32 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = _block_causal_sdpa(q32, k32, v32, cu, 0.125)
    rq, rk, rv = torch.autograd.grad(ref, (q32, k32, v32), grad.double())
    for got, want in ((out, ref), (dq, rq), (dk, rk), (dv, rv)):
        assert ((got.double() - want).norm() / want.norm()) < 1e-2


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("compile_layers", [False, True])
def test_packed_bf16_on_gpu_matches_padded(tokenizer, items, compile_layers):
    padded_model = lora_model(len(tokenizer), torch.bfloat16, "cuda")
    packed_model = copy.deepcopy(padded_model)
    prepare_model_for_packing(packed_model, compile_layers=compile_layers, chunk_size=16)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        want_loss, want_grads = padded_step(padded_model, tokenizer, [items[:4], items[4:]], "cuda")
        got_loss, got_grads = packed_step(packed_model, [items[:2], items[2:]], device="cuda")
    assert got_loss == pytest.approx(want_loss, rel=2e-2)
    assert_close_grads(got_grads, want_grads, rtol=5e-2)


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("compile_layers", [False, True])
def test_captured_micro_batches_on_gpu_match_padded(tokenizer, items, compile_layers):
    """finetune.cuda_graphs: a length's first micro-batch is captured, the next replays the graph with its own data;
    the step's loss and LoRA gradients are the padded recipe's, and again on a second step of replays."""
    from workers.captured_steps import CapturedMicroBatches, FlatGradients

    padded_model = lora_model(len(tokenizer), torch.bfloat16, "cuda")
    packed_model = copy.deepcopy(padded_model)
    prepare_model_for_packing(packed_model, compile_layers=compile_layers, chunk_size=16)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        want_loss, want_grads = padded_step(padded_model, tokenizer, [items[:4], items[4:]], "cuda")
    collate = PackingCollator(max_length=64, pad_to_multiple_of=64, segments=len(items) + 1)
    batches = [collate(group) for group in (items[:2], items[2:])]
    total = sum(batch["target_positions"].numel() for batch in batches)
    grads = FlatGradients([param for param in packed_model.parameters() if param.requires_grad])

    def loss_fn(inputs):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            return packed_model(**inputs).loss

    run = CapturedMicroBatches(loss_fn, grads, causal_lm(packed_model)._prunetune_loss, capture=True)
    for _ in range(2):
        grads.zero()
        loss_sum = 0.0
        for batch in batches:
            inputs = {key: value.to("cuda") if torch.is_tensor(value) else value for key, value in batch.items()
                      if key != "target_positions"}
            inputs["num_items_in_batch"] = torch.tensor(total, device="cuda")
            loss_sum += float(run(inputs))
        assert loss_sum == pytest.approx(want_loss, rel=2e-2)
        assert_close_grads(lora_grads(packed_model), want_grads, rtol=5e-2)
    assert run.graphs and all(graph is not None for graph, _ in run.graphs.values())
