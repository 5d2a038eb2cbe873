import pytest
import torch
from torch import nn

from lightning_llmdbg.selection import block_index_of, resolve_groups
from tests.helpers import small_gpt


def _llama_like() -> nn.Module:
    layer = lambda: nn.ModuleDict({"self_attn": nn.Linear(4, 4), "mlp": nn.Linear(4, 4), "input_layernorm": nn.LayerNorm(4)})
    root = nn.Module()
    root.model = nn.ModuleDict(
        {"embed_tokens": nn.Embedding(10, 4), "layers": nn.ModuleList([layer() for _ in range(3)]), "norm": nn.LayerNorm(4)}
    )
    root.lm_head = nn.Linear(4, 10, bias=False)
    return root


def _bert_like() -> nn.Module:
    root = nn.Module()
    root.bert = nn.ModuleDict(
        {
            "embeddings": nn.ModuleDict({"word_embeddings": nn.Embedding(10, 4), "LayerNorm": nn.LayerNorm(4)}),
            "encoder": nn.ModuleDict({"layer": nn.ModuleList([nn.Linear(4, 4) for _ in range(2)])}),
            "pooler": nn.ModuleDict({"dense": nn.Linear(4, 4)}),
        }
    )
    root.classifier = nn.Linear(4, 2)
    return root


def _names(groups):
    return {g: [n for n, _ in members] for g, members in groups.groups.items()}


def test_blocks_on_reference_gpt():
    groups = _names(resolve_groups(small_gpt()))
    assert list(groups) == ["embeddings", "block_0", "block_1", "block_2", "ln_f", "head"]
    assert groups["embeddings"] == ["model.transformer.wte.weight", "model.transformer.wpe.weight"]
    assert all(n.startswith("model.transformer.h.1.") for n in groups["block_1"])
    assert groups["head"] == ["model.lm_head.weight"]


def test_blocks_on_llama_naming():
    groups = _names(resolve_groups(_llama_like()))
    assert list(groups) == ["embeddings", "block_0", "block_1", "block_2", "norm", "head"]
    assert groups["block_2"] == [f"model.layers.2.{m}.{p}" for m in ("self_attn", "mlp", "input_layernorm") for p in ("weight", "bias")]


def test_blocks_on_bert_naming():
    groups = _names(resolve_groups(_bert_like()))
    assert list(groups) == ["embeddings", "block_0", "block_1", "pooler", "head"]
    assert "bert.embeddings.LayerNorm.weight" in groups["embeddings"]


def test_two_block_stacks_keep_their_container_names():
    root = nn.Module()
    root.encoder = nn.ModuleDict({"block": nn.ModuleList([nn.Linear(2, 2) for _ in range(2)])})
    root.decoder = nn.ModuleDict({"block": nn.ModuleList([nn.Linear(2, 2) for _ in range(2)])})
    assert list(_names(resolve_groups(root))) == ["encoder.block.0", "encoder.block.1", "decoder.block.0", "decoder.block.1"]


def test_a_lone_index_is_not_a_block():
    assert block_index_of(["wrapper.0.weight", "blocks.0.w", "blocks.1.w"]) == {"blocks.0.w": ("blocks", 0), "blocks.1.w": ("blocks", 1)}


def test_every_trainable_parameter_in_exactly_one_group_and_frozen_skipped():
    model = small_gpt()
    model.model.transformer.wpe.weight.requires_grad_(False)
    for spec in ("blocks", "parameters", {"attn": "*attn*", "mlp": ["*mlp*"]}):
        resolved = resolve_groups(model, spec)
        names = [n for members in resolved.groups.values() for n, _ in members]
        trainable = [n for n, p in model.named_parameters() if p.requires_grad]
        assert sorted(names) == sorted(trainable), spec
        assert resolved.frozen == ["model.transformer.wpe.weight"]


def test_glob_groups_leftovers_go_to_other():
    groups = _names(resolve_groups(small_gpt(), {"attn": "*.attn.*"}))
    assert list(groups) == ["attn", "other"]
    assert all(".attn." in n for n in groups["attn"]) and len(groups["attn"]) == 3 * 4


def test_glob_matching_nothing_names_pattern_and_closest_names():
    with pytest.raises(ValueError, match=r"'model.transformer.hh.\*'.*matches nothing.*'model.transformer.h"):
        resolve_groups(small_gpt(), {"x": "model.transformer.hh.*"})


def test_param_groups_by_name_or_index():
    model = small_gpt()
    optimizer = model.configure_optimizers()
    groups = _names(resolve_groups(model, "param_groups", [optimizer]))
    assert list(groups) == ["decay", "no_decay"]
    unnamed = torch.optim.SGD([{"params": [model.model.lm_head.weight]}, {"params": list(model.model.transformer.parameters())}], lr=0.1)
    assert list(_names(resolve_groups(model, "param_groups", [unnamed]))) == ["group_0", "group_1"]


@pytest.mark.parametrize("bad", ["block", 3, None])
def test_unknown_mode_names_the_value(bad):
    with pytest.raises(ValueError, match=repr(bad)):
        resolve_groups(small_gpt(), bad)


@pytest.mark.parametrize(
    "bad, match",
    [({}, "empty dict"), ({"": "*"}, "got ''"), ({"attn": 3}, "'attn'.*got 3"), ({"attn": []}, r"'attn'.*got \[\]"), ({"attn": ["*", None]}, "None")],
)
def test_bad_glob_specs_name_the_value(bad, match):
    from lightning_llmdbg.selection import validate_group_spec

    with pytest.raises(ValueError, match=match):
        validate_group_spec(bad)


def test_module_globs_select_the_outermost_match_relative_to_wrappers():
    from lightning_llmdbg.selection import resolve_modules

    model = small_gpt()
    found = resolve_modules(model, ["transformer.h.*"])
    assert list(found) == ["transformer.h.0", "transformer.h.1", "transformer.h.2"]
    assert found["transformer.h.1"] is model.model.transformer.h[1]
    assert list(resolve_modules(model, ["*.mlp"])) == [f"model.transformer.h.{i}.mlp" for i in range(3)]
    assert list(resolve_modules(model, [nn.LayerNorm]))[-1] == "model.transformer.ln_f"


def test_module_keys_that_collide_are_refused():
    from lightning_llmdbg.selection import resolve_modules

    root = nn.Module()
    root.encoder = nn.ModuleDict({"layer": nn.ModuleList([nn.Linear(2, 2) for _ in range(2)])})
    root.decoder = nn.ModuleDict({"layer": nn.ModuleList([nn.Linear(2, 2) for _ in range(2)])})
    with pytest.raises(ValueError, match="Two modules would log as 'layer.0'"):
        resolve_modules(root, ["layer.*"])
