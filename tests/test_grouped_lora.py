"""Grouped LoRA (q/k/v, gate/up as groups) computes what peft computes, with fewer matrix products."""
from __future__ import annotations

import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM

from jobs.config import LORA_TARGETS
from workers.grouped_lora import JOINED_BASE, dropout_copies, group_lora_projections, groupable

pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")

SHAPE = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             vocab_size=128, max_position_embeddings=64, attn_implementation="sdpa")
ARCHITECTURES = {"llama": (LlamaConfig, LlamaForCausalLM), "qwen2": (Qwen2Config, Qwen2ForCausalLM),
                 "mistral": (MistralConfig, MistralForCausalLM)}


def lora_model(architecture: str = "llama", dropout: float = 0.0, attention: str = "sdpa", layers: int = 2,
               **lora: object) -> torch.nn.Module:
    """A small model (2 layers unless told) with LoRA on every recipe target, B non-zero so that A gets gradients."""
    torch.manual_seed(0)
    config_class, model_class = ARCHITECTURES[architecture]
    config = config_class(**{**SHAPE, "attn_implementation": attention, "num_hidden_layers": layers})
    model = get_peft_model(model_class(config),
                           LoraConfig(r=8, lora_alpha=16, lora_dropout=dropout, target_modules=list(LORA_TARGETS),
                                      task_type="CAUSAL_LM", **lora))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05)
    model.config.use_cache = False  # as in training; with a KV cache the model's own attention runs
    return model


def batch() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    input_ids = torch.randint(0, SHAPE["vocab_size"], (2, 12), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 9:] = 0  # a padded row: the attention mask must reach the attention function
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": input_ids.masked_fill(attention_mask == 0, -100)}


def loss_and_grads(model: torch.nn.Module) -> tuple[float, dict[str, torch.Tensor]]:
    model.zero_grad()
    loss = model(**batch()).loss
    loss.backward()
    return loss.item(), {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def assert_same(got: tuple[float, dict], want: tuple[float, dict]) -> None:
    assert got[0] == pytest.approx(want[0], rel=1e-6)
    assert got[1].keys() == want[1].keys() and len(want[1]) == 2 * 2 * len(LORA_TARGETS)  # A and B, 2 layers
    for name, grad in want[1].items():
        error = (got[1][name] - grad).norm() / grad.norm()
        assert error < 1e-5, f"{name}: relative error {error:.1e}"


@pytest.mark.parametrize("join_base", [False, True], ids=["separate-base", "joined-base"])
@pytest.mark.parametrize("architecture", sorted(ARCHITECTURES))
def test_grouped_loss_and_lora_grads_match_peft(architecture, join_base):
    reference = lora_model(architecture)
    grouped = copy.deepcopy(reference)
    # attention and MLP of both layers (Qwen2's q/k/v biases are joined too)
    assert group_lora_projections(grouped, join_base=join_base) == (4, 4 if join_base else 0)
    assert_same(loss_and_grads(grouped), loss_and_grads(reference))


def test_attention_without_a_registered_function_runs_its_own_code():
    reference = lora_model(attention="eager")  # transformers' default function, not in its registry
    grouped = copy.deepcopy(reference)
    assert group_lora_projections(grouped) == (4, 0)
    calls = []
    for layer in grouped.base_model.model.model.layers:
        own = layer.self_attn._prunetune_ungrouped_forward
        layer.self_attn._prunetune_ungrouped_forward = lambda *args, _own=own, **kwargs: (
            calls.append(1), _own(*args, **kwargs))[1]
    assert_same(loss_and_grads(grouped), loss_and_grads(reference))
    assert len(calls) == 2  # each layer's attention, once


def test_dropout_copies_draw_one_mask_per_target():
    torch.manual_seed(0)
    x = torch.randn(64, 256) + 3.0  # no zeros of its own
    copies = dropout_copies(x, 3, p=0.25, training=True)
    assert copies.shape == (3, 64, 256)
    kept = copies != 0
    for target in range(3):
        assert kept[target].float().mean().item() == pytest.approx(0.75, abs=0.02)
        torch.testing.assert_close(copies[target][kept[target]], (x / 0.75)[kept[target]])
    assert (kept[0] != kept[1]).float().mean().item() > 0.3  # independent masks disagree on ~37.5%
    assert dropout_copies(x, 3, p=0.25, training=False).data_ptr() == x.data_ptr()  # a view, no copy


def test_with_dropout_training_draws_and_evaluation_matches_peft():
    reference = lora_model(dropout=0.5)
    grouped = copy.deepcopy(reference)
    group_lora_projections(grouped)
    grouped.train()
    torch.manual_seed(2)
    first = loss_and_grads(grouped)[0]
    assert loss_and_grads(grouped)[0] != first  # fresh masks each call
    reference.eval(), grouped.eval()  # dropout off: the very same terms as peft
    assert_same(loss_and_grads(grouped), loss_and_grads(reference))


def test_merged_or_disabled_adapters_go_back_to_peft():
    reference = lora_model()
    grouped = copy.deepcopy(reference)
    group_lora_projections(grouped)
    for model in (reference, grouped):
        model.merge_adapter()
    assert not groupable([grouped.base_model.model.model.layers[0].self_attn.q_proj])
    with torch.no_grad():
        merged = [model(**batch()).loss.item() for model in (reference, grouped)]
    assert merged[0] == pytest.approx(merged[1], rel=1e-6)
    for model in (reference, grouped):
        model.unmerge_adapter()
        model.base_model.disable_adapter_layers()
    with torch.no_grad():
        disabled = [model(**batch()).loss.item() for model in (reference, grouped)]
    assert disabled[0] == pytest.approx(disabled[1], rel=1e-6)


def test_zero3_configs_turn_grouping_off():
    from workers.distributed import load_deepspeed_config
    from workers.finetune import shards_parameters

    configs = [load_deepspeed_config(name) for name in ("zero3", "zero3_offload", "zero2")] + [None]
    assert [shards_parameters(config) for config in configs] == [True, True, False, False]


def test_targets_of_different_ranks_are_left_to_peft():
    model = lora_model(rank_pattern={"k_proj": 4})
    assert group_lora_projections(model, join_base=True) == (2, 2)  # the MLPs; q/k/v differ in rank
    attention = model.base_model.model.model.layers[0].self_attn
    assert "forward" not in attention.__dict__


class CountMatmuls(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.bmm, torch.ops.aten.addmm):
            self.count += 1
        return func(*args, **(kwargs or {}))


def test_grouping_cuts_the_matrix_products_of_a_step():
    counts = {}
    for name in ("peft", "grouped", "joined"):
        model = lora_model(dropout=0.05)
        if name != "peft":
            group_lora_projections(model, join_base=name == "joined")
        with CountMatmuls() as forward:
            loss = model(**batch()).loss
        with CountMatmuls() as backward:
            loss.backward()
        counts[name] = (forward.count, backward.count)
    # forward, per layer: LoRA products 14 -> 8. Backward: 28 -> 16, except that layer 0's attention input
    # (embeddings and norm are frozen) needs no gradient, which spares peft 3 products and the group 1.
    assert counts["peft"][0] - counts["grouped"][0] == 2 * 6, counts
    assert counts["peft"][1] - counts["grouped"][1] == 2 * 12 - 2, counts
    # joined base weights, per layer: q/k/v 3 -> 1 and gate/up 2 -> 1 forward, and the same for the input's
    # gradient, which layer 0's attention does not need
    assert counts["grouped"][0] - counts["joined"][0] == 2 * 3, counts
    assert counts["grouped"][1] - counts["joined"][1] == 2 * 3 - 2, counts


@pytest.mark.parametrize("join_base", [False, True], ids=["separate-base", "joined-base"])
def test_compiled_layers_trace_the_grouped_forward_whole(join_base):
    reference = lora_model("qwen2")
    grouped = copy.deepcopy(reference)
    group_lora_projections(grouped, join_base=join_base)
    torch._dynamo.reset()  # earlier tests' compiles of the same layer code count against the recompile limit
    for layer in grouped.base_model.model.model.layers:
        layer.compile(backend="aot_eager", fullgraph=True, dynamic=True)
    assert_same(loss_and_grads(grouped), loss_and_grads(reference))


def compiles_for_one_step(layers: int, join_base: bool) -> int:
    model = lora_model("qwen2", layers=layers)
    group_lora_projections(model, join_base=join_base)
    compiles = []

    def backend(graph, example_inputs):
        compiles.append(1)
        return torch._dynamo.lookup_backend("aot_eager")(graph, example_inputs)

    torch._dynamo.reset()
    for layer in model.base_model.model.model.layers:
        layer.compile(backend=backend, dynamic=True)
    loss_and_grads(model)
    return len(compiles)


def test_joined_tensors_are_graph_inputs_so_later_layers_reuse_the_compiled_graph():
    # Layer 0 compiles apart (its input needs no gradient). Were the joined tensors constants of the graph,
    # each further layer would compile its own.
    assert compiles_for_one_step(4, join_base=True) == compiles_for_one_step(2, join_base=True) \
        == compiles_for_one_step(2, join_base=False)


def attention_and_mlp(model: torch.nn.Module) -> list[torch.nn.Module]:
    return [module for layer in model.base_model.model.model.layers for module in (layer.self_attn, layer.mlp)]


def test_joined_base_weights_are_views_of_one_tensor_and_nothing_else_changes():
    reference = lora_model("qwen2")
    joined = copy.deepcopy(reference)
    parameters_before = dict(joined.named_parameters())
    group_lora_projections(joined, join_base=True)
    assert dict(joined.named_parameters()).keys() == parameters_before.keys()
    assert all(parameters_before[name] is param for name, param in joined.named_parameters())  # same objects
    for name, value in reference.state_dict().items():
        torch.testing.assert_close(joined.state_dict()[name], value, rtol=0, atol=0)
    attention = joined.base_model.model.model.layers[0].self_attn
    weight, bias = getattr(attention, JOINED_BASE)
    offset = 0
    for projection in (attention.q_proj, attention.k_proj, attention.v_proj):
        base = projection.base_layer
        assert base.weight.untyped_storage().data_ptr() == weight.untyped_storage().data_ptr()
        assert base.weight.storage_offset() == offset * weight.shape[1]
        assert base.bias.untyped_storage().data_ptr() == bias.untyped_storage().data_ptr()
        offset += base.out_features
    assert offset == weight.shape[0]


def test_joined_base_weights_follow_the_model_to_another_dtype():
    reference = lora_model()
    joined = copy.deepcopy(reference)
    group_lora_projections(joined, join_base=True)
    unchanged = {id(module): getattr(module, JOINED_BASE)[0] for module in attention_and_mlp(joined)}
    joined.to(torch.float32)  # already fp32: nothing converted, nothing copied
    assert all(getattr(module, JOINED_BASE)[0] is unchanged[id(module)] for module in attention_and_mlp(joined))
    for model in (reference, joined):
        model.to(torch.float64)  # as .to("cuda") does: Module._apply converts each parameter on its own
    for module in attention_and_mlp(joined):
        weight, _ = getattr(module, JOINED_BASE)
        assert weight.dtype == torch.float64
        first = (module.q_proj if hasattr(module, "q_proj") else module.gate_proj).base_layer.weight
        assert first.dtype == torch.float64 and first.data_ptr() == weight.data_ptr()
    assert_same(loss_and_grads(joined), loss_and_grads(reference))


def test_in_place_merge_and_unmerge_keep_the_joined_weights():
    reference = lora_model()
    joined = copy.deepcopy(reference)
    group_lora_projections(joined, join_base=True)
    for model in (reference, joined):
        model.merge_adapter()  # peft merges in place: the joined tensor holds the merged weights
    with torch.no_grad():
        merged = [model(**batch()).loss.item() for model in (reference, joined)]
    assert merged[0] == pytest.approx(merged[1], rel=1e-6)
    for model in (reference, joined):
        model.unmerge_adapter()
    assert_same(loss_and_grads(joined), loss_and_grads(reference))


def test_trainable_base_weights_are_grouped_but_not_joined():
    model = lora_model()
    model.base_model.model.model.layers[0].mlp.up_proj.base_layer.weight.requires_grad_(True)
    assert group_lora_projections(model, join_base=True) == (4, 3)
    assert JOINED_BASE not in model.base_model.model.model.layers[0].mlp.__dict__


def test_a_move_while_merged_drops_the_joined_tensor_rather_than_keep_a_stale_one():
    reference = lora_model()
    joined = copy.deepcopy(reference)
    group_lora_projections(joined, join_base=True)
    for model in (reference, joined):
        model.merge_adapter()
        model.to(torch.float64)  # while merged the group is peft's: nothing to join the moved weights for
        model.unmerge_adapter()
    assert not any(JOINED_BASE in module.__dict__ for module in attention_and_mlp(joined))
    assert_same(loss_and_grads(joined), loss_and_grads(reference))  # grouped, each base weight on its own
