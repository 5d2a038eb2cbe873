import math

import pytest

from lightning_llmdbg.rules import (
    AttentionEntropyDrop,
    DeadUnits,
    ExplodingGradient,
    History,
    NonFinite,
    OutlierGrowth,
    ParamNormJump,
    Spike,
    UpdateRatio,
    VanishingGradient,
    default_rules,
    evaluate,
    group_of,
)

NORM = "llmdbg/grad_norm/block_1"


def _history(key, values, window=128):
    history = History(window)
    for v in values:
        history.add({key: v})
    return history


def _noisy(n, center=1.0, spread=0.1):
    # Deterministic values spread evenly around `center` (no RNG: the thresholds are asserted exactly).
    return [center * (1 + spread * ((i * 37) % 21 - 10) / 10) for i in range(n)]


def test_spike_fires_above_the_robust_baseline_and_not_below():
    history = _history(NORM, _noisy(64))
    rule = Spike()
    assert rule.check(NORM, 1.15, history.get(NORM), 64) is None  # inside the noise
    anomaly = rule.check(NORM, 5.0, history.get(NORM), 64)
    assert anomaly is not None and anomaly.rule == "spike" and anomaly.group == "block_1" and anomaly.step == 64
    # median 1.0; MAD of the logs of the evenly spread values is ~0.05, floored at min_rel=0.05: limit ~exp(6*0.074)
    assert 1.3 < anomaly.threshold < 2.0
    assert "5.0x its baseline" in anomaly.message


def test_spike_waits_for_its_warmup_and_ignores_drops():
    rule = Spike(warmup=16)
    assert rule.check(NORM, 100.0, _history(NORM, _noisy(15)).get(NORM), 15) is None
    assert rule.check(NORM, 100.0, _history(NORM, _noisy(16)).get(NORM), 16) is not None
    assert rule.check(NORM, 0.01, _history(NORM, _noisy(64)).get(NORM), 64) is None  # a drop is not a spike


def test_earlier_spikes_do_not_raise_the_bar():
    values = _noisy(100) + [50.0] * 10  # ten earlier spikes in the window
    assert Spike().check(NORM, 5.0, _history(NORM, values).get(NORM), 110) is not None


def test_history_is_bounded_and_skips_nonfinite_values():
    history = History(window=4)
    for v in [1.0, float("nan"), 2.0, float("inf"), 3.0, 4.0, 5.0]:
        history.add({"loss": v})
    assert list(history.get("loss")) == [2.0, 3.0, 4.0, 5.0]
    restored = History(window=4)
    restored.load_state_dict(history.state_dict())
    assert list(restored.get("loss")) == [2.0, 3.0, 4.0, 5.0]


def test_vanishing_gradient_by_floor_and_by_drop():
    rule = VanishingGradient()
    assert rule.check(NORM, 0.0, (), 3).threshold == 1e-7  # the floor needs no history
    history = _history(NORM, _noisy(32)).get(NORM)
    assert rule.check(NORM, 2e-4, history, 32) is not None  # 5000x below its baseline
    assert rule.check(NORM, 2e-2, history, 32) is None


def test_exploding_gradient_and_update_ratio_band():
    assert ExplodingGradient().check(NORM, 150.0, (), 1).level == "ERROR"
    assert ExplodingGradient().check(NORM, 50.0, (), 1) is None
    ratio = "llmdbg/update_ratio/block_0"
    assert UpdateRatio().check(ratio, 1e-3, (), 60) is None
    assert UpdateRatio().check(ratio, 0.5, (), 60).threshold == 0.1
    assert UpdateRatio().check(ratio, 0.0, (), 60).threshold == 1e-8
    assert UpdateRatio().check(ratio, 0.5, (), 49) is None  # Adam's first updates: about lr per element
    assert UpdateRatio(warmup_steps=0).check(ratio, 0.5, (), 0) is not None


def test_param_norm_jump():
    key = "llmdbg/param_norm/block_2"
    assert ParamNormJump().check(key, 8.3, [8.2], 25) is None
    assert ParamNormJump().check(key, 400.0, [8.2], 25).group == "block_2"
    assert ParamNormJump().check(key, 1.0, [8.2], 25) is not None  # shrinking counts too


def test_activation_rules():
    dead = "llmdbg/act/transformer.h.0.mlp.gelu/dead_frac"
    assert DeadUnits().check(dead, 0.6, (), 100).group == "transformer.h.0.mlp.gelu"
    assert DeadUnits().check(dead, 0.4, (), 100) is None
    assert DeadUnits().applies(dead) and DeadUnits(ignore=["*.gelu"]).applies(dead) is False
    assert not DeadUnits().applies("llmdbg/act/block_0/dead_frac")  # the residual stream is not units
    entropy = "llmdbg/attn/block_1/entropy_mean"
    baseline = [2.0] * 8
    assert AttentionEntropyDrop().check(entropy, 0.5, baseline, 900) is not None
    assert AttentionEntropyDrop().check(entropy, 1.5, baseline, 900) is None
    assert AttentionEntropyDrop().check(entropy, 0.5, baseline[:7], 900) is None  # warm-up
    outliers = "llmdbg/act/block_2/outliers"
    assert OutlierGrowth().check(outliers, 3.0, [1.0] * 8, 900) is None  # +2: not enough
    assert OutlierGrowth().check(outliers, 9.0, [1.0] * 8, 900) is not None
    assert OutlierGrowth().check(outliers, 30.0, [20.0] * 8, 900) is None  # 1.5x: not a doubling


def test_nonfinite_verdicts_name_loss_parameter_or_another_rank():
    rule = NonFinite()
    assert rule.verdict(7, float("inf"), []).group == "loss"
    named = rule.verdict(7, 2.0, [("model.transformer.h.1.mlp.c_fc.weight", "block_1", 3)])
    assert named.group == "block_1" and "model.transformer.h.1.mlp.c_fc.weight (3)" in named.message
    assert named.level == "ERROR" and named.title == "llmdbg nonfinite: block_1"
    assert "another rank" in rule.verdict(7, 2.0, [], elsewhere=True).message


def test_evaluate_gives_one_verdict_per_signal_and_leaves_history_alone():
    history = _history(NORM, _noisy(32))
    before = list(history.get(NORM))
    found = evaluate(default_rules(), {NORM: 500.0, "llmdbg/grad_norm/block_2": 1.0}, history, 32)
    assert [(a.rule, a.signal) for a in found] == [("exploding_gradient", NORM)]  # exploding wins over spike
    assert list(history.get(NORM)) == before


def test_titles_fit_wandb():
    anomaly = Spike().check("llmdbg/grad_norm/" + "x" * 100, 50.0, [1.0] * 20, 1)
    assert len(anomaly.title) < 64 and anomaly.title.startswith("llmdbg spike: ")


def test_group_of():
    assert group_of("llmdbg/grad_norm/block_3") == "block_3"
    assert group_of("llmdbg/act/block_1/dead_frac") == "block_1"
    assert group_of("loss") == "loss"


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: Spike(k=0), r"`k`.*0"),
        (lambda: Spike(patterns="loss"), r"`patterns`.*'loss'"),
        (lambda: VanishingGradient(floor=-1), r"`floor`.*-1"),
        (lambda: UpdateRatio(low=1.0, high=0.1), r"low=1\.0"),
        (lambda: DeadUnits(max_frac=1.5), r"`max_frac`.*1\.5"),
        (lambda: ParamNormJump(factor=1), r"`factor`.*1"),
        (lambda: NonFinite(scaler_patience=0), r"`scaler_patience`.*0"),
        (lambda: History(window=1), r"`window`.*1"),
    ],
)
def test_bad_arguments_name_the_value(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_nan_values_are_never_a_spike_or_a_drop():
    nan = math.nan
    history = _history(NORM, _noisy(32)).get(NORM)
    assert all(rule.check(NORM, nan, history, 1) is None for rule in (Spike(), VanishingGradient(), ExplodingGradient()))
