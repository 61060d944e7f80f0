"""Model registry and the built-in models: shapes, causality, config errors."""

from __future__ import annotations

import pytest
import torch

from orchestrator.errors import UserError
from trainers.models import MODELS, build_model
from trainers.registry import Registry

TINY_GPT = {"vocab_size": 256, "context": 16, "n_layer": 2, "n_head": 2, "n_embd": 32}


def test_registry_refuses_duplicates() -> None:
    registry: Registry[int] = Registry(kind="thing", field="x.name")
    registry.register("a")(1)
    with pytest.raises(ValueError, match="thing 'a' is already registered"):
        registry.register("a")(2)


def test_model_registry_refuses_duplicates() -> None:
    with pytest.raises(ValueError, match="'mlp'"):
        MODELS.register("mlp")(lambda: None)


def test_unknown_model_lists_what_exists() -> None:
    with pytest.raises(UserError) as info:
        build_model("vit", {})
    assert str(info.value) == "model.name: unknown model 'vit'; available: cnn, gpt, mlp, resnet"


@pytest.mark.parametrize(("name", "kwargs", "message"), [
    ("v" * 5000, {}, "model.name: unknown model 'vvvv"),
    ("cnn", {"width": "w" * 5000}, "model.kwargs.width: must be int, got 'wwww"),
])
def test_a_long_bad_value_is_cut_in_the_error_line(name: str, kwargs: dict, message: str) -> None:
    # the whole 5,000 characters were echoed, as no other field's error does (errors.shown)
    with pytest.raises(UserError) as info:
        build_model(name, kwargs)
    assert str(info.value).startswith(message) and "... (5,002 characters)" in str(info.value)
    assert len(str(info.value)) < 200


@pytest.mark.parametrize(
    ("name", "kwargs", "shape"),
    [
        ("mlp", {"in_features": 64, "hidden": 16, "depth": 2}, (4, 1, 8, 8)),
        ("cnn", {"in_channels": 1, "width": 8}, (4, 1, 8, 8)),
        ("cnn", {"in_channels": 3, "width": 8}, (4, 3, 32, 32)),
        ("resnet", {"width": 8, "depth": 1, "stages": 3}, (4, 3, 32, 32)),
    ],
)
def test_classifier_output_shape(name: str, kwargs: dict, shape: tuple[int, ...]) -> None:
    model = build_model(name, {**kwargs, "num_classes": 7})
    assert model(torch.rand(shape)).shape == (4, 7)


def test_gpt_output_shape_and_tied_head() -> None:
    model = build_model("gpt", TINY_GPT)
    tokens = torch.randint(0, 256, (3, 10))
    assert model(tokens).shape == (3, 10, 256)
    assert model.head.weight is model.tok_emb.weight


def test_gpt_is_causal() -> None:
    torch.manual_seed(0)
    model = build_model("gpt", TINY_GPT).eval()
    tokens = torch.randint(0, 256, (1, 16))
    changed = tokens.clone()
    changed[0, 10:] = (changed[0, 10:] + 1) % 256
    with torch.no_grad():
        before, after = model(tokens), model(changed)
    torch.testing.assert_close(before[:, :10], after[:, :10])
    assert not torch.allclose(before[:, 10:], after[:, 10:])


def test_gpt_rejects_sequence_longer_than_context() -> None:
    model = build_model("gpt", TINY_GPT)
    with pytest.raises(UserError, match="model.kwargs.context"):
        model(torch.zeros(1, 17, dtype=torch.long))


def test_gpt_flops_per_token() -> None:
    model = build_model("gpt", TINY_GPT)
    params = sum(p.numel() for p in model.parameters()) - 16 * 32  # less position embeddings
    assert model.flops_per_token() == 6 * params + 12 * 2 * 32 * 16


@pytest.mark.parametrize(
    ("name", "kwargs", "message"),
    [
        ("cnn", {"widht": 8}, r"model.kwargs: cnn\(\) got an unexpected keyword argument 'widht'"),
        ("mlp", {"hidden": "big"}, "model.kwargs.hidden: must be int, got 'big'"),
        ("resnet", {"depth": 0}, "model.kwargs.depth: must be > 0, got 0"),
        ("gpt", {"n_embd": 30, "n_head": 4}, "model.kwargs.n_embd: must be divisible by n_head"),
        ("gpt", {"dropout": 1.5}, r"model.kwargs.dropout: must be in \[0, 1\)"),
    ],
)
def test_bad_kwargs_are_user_errors(name: str, kwargs: dict, message: str) -> None:
    with pytest.raises(UserError, match=message):
        build_model(name, kwargs)


def test_integer_dropout_is_accepted() -> None:
    # YAML reads `dropout: 0` as an int.
    build_model("gpt", {**TINY_GPT, "dropout": 0})
