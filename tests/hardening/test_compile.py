"""A `torch.compile`d model: the callbacks log the same values as on the eager model, nothing compiles after the
first sampled step and the step after it, and every step that is not sampled runs one and the same full graph.

The backend is `aot_eager` (no C++ build) wrapped to count the runs of each compiled graph. Ten blocks is more
than dynamo's recompile limit (8): a hook that made each block specialise would push blocks into eager mode.
"""

import collections

import pytest
import pytorch_lightning as pl
import torch
import torch._dynamo
from pytorch_lightning.loggers import TensorBoardLogger

from lightning_llmdbg import ActivationProbe, AnomalyAlert, GradientMonitor, HardExampleLogger, LLMDebugger
from lightning_llmdbg.testing import TinyGPTModule
from tests.helpers import count_hooks, read_events, scalars, small_data, small_gpt, trainer_kwargs

EVERY = 4
STEPS = 12


class GraphCounter:
    """A torch.compile backend (aot_eager underneath) that counts the runs of each compiled graph."""

    def __init__(self) -> None:
        self.calls: collections.Counter = collections.Counter()
        self.inputs: dict[str, int] = {}  # graph id -> number of inputs (the parameters are inputs under aot_eager)

    def __call__(self, gm, example_inputs):
        graph_id = str(torch._guards.CompileContext.current_compile_id())
        self.inputs[graph_id] = len(example_inputs)
        compiled = torch._dynamo.backends.registry.lookup_backend("aot_eager")(gm, example_inputs)

        def run(*args):
            self.calls[graph_id] += 1
            return compiled(*args)

        return run


class PerStep(pl.Callback):
    """Per optimizer step: how many graphs were compiled, and which graphs ran how often."""

    def __init__(self, counter: GraphCounter) -> None:
        self.counter, self.seen, self.graphs_seen = counter, collections.Counter(), 0
        self.ran: dict[int, dict[str, int]] = {}
        self.compiled: dict[int, int] = {}

    def on_train_batch_end(self, trainer, *args) -> None:
        step, now = trainer.global_step - 1, collections.Counter(self.counter.calls)
        self.ran[step] = {k: v - self.seen[k] for k, v in now.items() if v != self.seen[k]}
        graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
        self.compiled[step], self.graphs_seen, self.seen = graphs - self.graphs_seen, graphs, now


CALLBACKS = {
    "probe": lambda: [ActivationProbe(every_n_steps=EVERY)],
    "probe_gradients_histograms": lambda: [ActivationProbe(every_n_steps=EVERY, gradients=True, histograms=True)],
    "hard_examples": lambda: [HardExampleLogger(k=2, every_n_steps=EVERY)],
    "gradients_alerts": lambda: [GradientMonitor(every_n_steps=EVERY, update_ratio=True), AnomalyAlert()],
}
CASES = [(name, "model", 3) for name in CALLBACKS] + [(name, "blocks", 10) for name in CALLBACKS]
CASES += [(name, "lightning_module", 3) for name in CALLBACKS]


class WithoutSelfLog(TinyGPTModule):
    """`trainer.fit(torch.compile(lightning_module))` fails in Lightning 2.6 / torch 2.13 when training_step calls
    `self.log` (dynamo cannot trace Lightning's signature inspection), with or without any callback."""

    def training_step(self, batch, batch_idx):
        loss, per_example = self._losses(batch)
        return {"loss": loss, "per_example_loss": per_example.detach()}


def compile_(module, style, backend):
    if style == "lightning_module":
        return torch.compile(module, backend=backend)
    if style == "model":
        module.model = torch.compile(module.model, backend=backend)
    else:
        for block in module.model.transformer.h:
            block.compile(backend=backend)
    return module


@pytest.mark.parametrize("name, style, n_layer", CASES, ids=[f"{n}-{s}-{k}" for n, s, k in CASES])
def test_nothing_recompiles_and_unsampled_steps_run_the_plain_graph(tmp_path, name, style, n_layer):
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    counter = GraphCounter()
    module = WithoutSelfLog(small_gpt(n_layer=n_layer).config)
    fitted = compile_(module, style, counter)
    record = PerStep(counter)
    trainer = pl.Trainer(
        max_steps=STEPS, logger=TensorBoardLogger(str(tmp_path)), callbacks=[*CALLBACKS[name](), record],
        **trainer_kwargs(),
    )
    trainer.fit(fitted, small_data())

    assert {s: n for s, n in record.compiled.items() if s >= 2 and n} == {}, "compiled after warm-up"
    unsampled = [record.ran[s] for s in range(2, STEPS) if s % EVERY]
    assert all(ran == unsampled[0] for ran in unsampled), "steps that are not sampled run different graphs"
    # One graph that takes every parameter: the whole model once, or one block graph shared by all blocks.
    assert len(unsampled[0]) == 1, unsampled[0]
    (graph, runs), = unsampled[0].items()
    unit = module.model.transformer.h[0] if style == "blocks" else module.model
    assert runs == (n_layer if style == "blocks" else 1)
    assert counter.inputs[graph] >= len(list(unit.parameters())), "the plain graph covers only part of the model"
    assert count_hooks(module) == 0


def test_a_compiled_model_logs_what_the_eager_model_logs(tmp_path):
    every = {"every_n_steps": EVERY}
    logged = {}
    for style in ("eager", "compiled"):
        torch._dynamo.reset()
        module = small_gpt()
        if style == "compiled":
            compile_(module, "model", "aot_eager")
        debugger = LLMDebugger(gradients=every, activations={**every, "gradients": True}, examples={**every, "k": 2})
        logger = TensorBoardLogger(str(tmp_path), name=style, version=0)
        trainer = pl.Trainer(max_steps=STEPS, logger=logger, callbacks=[debugger], **trainer_kwargs())
        trainer.fit(module, small_data())
        events = read_events(logger.log_dir)
        logged[style] = {t: scalars(events, t) for t in events.Tags()["scalars"] if t.startswith("llmdbg/")}
    # The same keys (module names carry no `_orig_mod`), at the same steps, with the same values.
    assert sorted(logged["compiled"]) == sorted(logged["eager"])
    assert {"llmdbg/act/block_2/rms", "llmdbg/act_grad/block_0/rms", "llmdbg/attn/block_1/entropy_min"} <= set(logged["eager"])
    for tag, eager in logged["eager"].items():
        assert sorted(logged["compiled"][tag]) == sorted(eager), tag
        for step, value in eager.items():
            assert logged["compiled"][tag][step] == pytest.approx(value, rel=1e-4, abs=1e-7), (tag, step)


def _causal_attention(q, k, v):
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)


class InnerAttention(torch.nn.Module):
    """Attention whose ``scaled_dot_product_attention`` call sits in a function of its own, compiled or not."""

    def __init__(self, width: int, heads: int, attend) -> None:
        super().__init__()
        self.heads, self.attend = heads, attend
        self.qkv, self.out = torch.nn.Linear(width, 3 * width), torch.nn.Linear(width, width)

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = (t.view(B, T, self.heads, C // self.heads).transpose(1, 2) for t in self.qkv(x).split(C, 2))
        return self.out(self.attend(q, k, v).transpose(1, 2).reshape(B, T, C))


class InnerAttentionBlock(torch.nn.Module):
    def __init__(self, width: int, heads: int, attend) -> None:
        super().__init__()
        self.ln, self.attn, self.mlp = torch.nn.LayerNorm(width), InnerAttention(width, heads, attend), torch.nn.Linear(width, width)

    def forward(self, x):
        x = x + self.attn(self.ln(x))
        return x + self.mlp(x)


class InnerAttentionLM(pl.LightningModule):
    def __init__(self, attend) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(256, 32)
        self.h = torch.nn.ModuleList([InnerAttentionBlock(32, 4, attend) for _ in range(2)])
        self.lm_head = torch.nn.Linear(32, 256)

    def training_step(self, batch, batch_idx):
        x = self.embed(batch["input_ids"])
        for block in self.h:
            x = block(x)
        return torch.nn.functional.cross_entropy(self.lm_head(x).flatten(0, 1), batch["input_ids"].flatten())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_a_compiled_function_that_calls_sdpa_inside_an_attention_module_gives_the_eager_entropy(tmp_path):
    """The probe's function mode is entered around the compiled call: dynamo compiles it once more, with the mode,
    for sampled steps (and keeps its first graph for the others), and the entropy is that of the eager function."""
    logged, counter = {}, GraphCounter()
    for style in ("eager", "compiled"):
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
        pl.seed_everything(0)
        module = InnerAttentionLM(torch.compile(_causal_attention, backend=counter) if style == "compiled" else _causal_attention)
        logger = TensorBoardLogger(str(tmp_path), name=style, version=0)
        probe = ActivationProbe(modules=["h.*"], every_n_steps=2)
        trainer = pl.Trainer(max_steps=6, logger=logger, callbacks=[probe], **trainer_kwargs())
        trainer.fit(module, small_data())
        events = read_events(logger.log_dir)
        logged[style] = {t: scalars(events, t) for t in events.Tags()["scalars"] if t.startswith("llmdbg/attn/")}
        assert count_hooks(module) == 0 and torch._C._len_torch_function_stack() == 0
    assert sorted(logged["eager"]) == sorted(logged["compiled"]) == sorted(
        f"llmdbg/attn/h.{i}/{s}" for i in range(2) for s in ("entropy_mean", "entropy_min", "logit_max")
    )
    for tag, eager in logged["eager"].items():
        assert sorted(eager) == [0, 2, 4], tag
        for step, value in eager.items():
            assert logged["compiled"][tag][step] == pytest.approx(value, rel=1e-5), (tag, step)
    assert len(counter.inputs) <= 2, "the attention function compiled more than once per mode"
    assert sum(counter.calls.values()) == 6 * 2, "a step ran the attention function outside its compiled graphs"
