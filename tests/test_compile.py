"""`training.compile`: a transformer's blocks are compiled one by one, in place (torchtitan's way),
and one compilation serves every layer; other models are compiled whole. The tests compile with
the `aot_eager` backend (dynamo's graphs and AOTAutograd's forward/backward split, no code
generation): what is checked is which modules get compiled and how often, in ~3 s instead of ~30 s
of inductor's C++ compiler; `python -m benchmarks.bench_compile` runs inductor."""

from __future__ import annotations

import copy
import functools

import pytest
import torch
from torch._dynamo.utils import counters

from trainers.config import TrainingConfig
from trainers.models import build_model
from trainers.step import TrainStep, compiled, eager, make_optimizer, repeated_blocks

CFG = TrainingConfig(max_steps=1, compile=True, optimizer="sgd", lr=0.1)
GPT = {"vocab_size": 64, "context": 16, "n_layer": 3, "n_head": 2, "n_embd": 32, "dropout": 0.0}


def _step(model: torch.nn.Module, tokens: torch.Tensor) -> float:
    step = TrainStep(model, make_optimizer(model, CFG), cfg=CFG, device=torch.device("cpu"))
    return float(step([(tokens, None)]))


@pytest.fixture(autouse=True)
def _aot_eager(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="aot_eager"))


def test_each_block_compiled_in_place_once_for_all_layers_same_loss_same_keys() -> None:
    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    model = build_model("gpt", GPT)
    reference = copy.deepcopy(model)
    keys = list(model.state_dict())
    tokens = torch.randint(0, 64, (4, 16))

    out = compiled(model, CFG)
    assert out is model and len(repeated_blocks(model)) == 3
    assert all(b._compiled_call_impl is not None for b in model.blocks)
    assert list(model.state_dict()) == keys  # checkpoints keep their keys

    loss = _step(model, tokens)
    assert abs(loss - _step(reference, tokens)) < 1e-4
    for a, b in zip(model.parameters(), reference.parameters(), strict=True):  # the same update
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    assert counters["stats"]["unique_graphs"] == 1  # one block's graph serves all three layers

    with eager():  # another shape, run eagerly: nothing more compiled
        _step(model, torch.randint(0, 64, (7, 16)))
    assert counters["stats"]["unique_graphs"] == 1


def test_a_model_without_a_stack_of_blocks_is_compiled_whole() -> None:
    cnn = build_model("cnn", {"in_channels": 1, "num_classes": 10, "width": 8})
    assert repeated_blocks(cnn) == []
    assert isinstance(compiled(cnn, CFG), torch._dynamo.eval_frame.OptimizedModule)
    assert compiled(cnn, CFG.model_copy(update={"compile": False})) is cnn


def test_the_profilers_fit_check_compiles_nothing() -> None:
    """Past its time budget the profiler checks bigger batches fit with the module run eagerly
    (`Bench.fits`): blocks compiled in place must not compile those shapes."""
    from trainers.profiling import Bench

    torch._dynamo.reset()
    counters.clear()
    bench = Bench.__new__(Bench)  # the parts `fits` uses, without a data set
    bench.device = torch.device("cpu")
    bench.model = compiled(build_model("gpt", GPT), CFG)
    bench.plain = TrainStep(bench.model, make_optimizer(bench.model, CFG), cfg=CFG, device=bench.device)
    bench.batch = lambda rows, size: (torch.randint(0, 64, (size, 16)), None)
    _step(bench.model, torch.randint(0, 64, (4, 16)))
    assert counters["stats"]["unique_graphs"] == 1
    assert bench.fits({}, 8) and bench.fits({}, 16)
    assert counters["stats"]["unique_graphs"] == 1
