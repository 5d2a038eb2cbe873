import math

import pytest
import torch

from lightning_llmdbg import stats
from tests.helpers import compiler_missing, requires_compiler


def _tensors():
    g = torch.Generator().manual_seed(0)
    return [torch.randn(5, 3, generator=g), torch.randn(7, generator=g), torch.randn(2, 2, 2, generator=g)]


def test_per_tensor_sums_of_squares_and_maxima_with_missing_entries():
    ts = _tensors()
    sumsq = stats.per_tensor_sumsq(ts, 5, [0, 2, 4], torch.device("cpu"))
    absmax = stats.per_tensor_absmax(ts, 5, [0, 2, 4], torch.device("cpu"))
    assert torch.allclose(sumsq, torch.tensor([float((t.double() ** 2).sum()) if t is not None else 0.0 for t in [ts[0], None, ts[1], None, ts[2]]]).float())
    assert absmax.tolist() == [ts[0].abs().max().item(), 0.0, ts[1].abs().max().item(), 0.0, ts[2].abs().max().item()]


def test_bf16_norms_are_accumulated_in_float32():
    t = torch.full((4096,), 0.01, dtype=torch.bfloat16)
    sumsq = stats.per_tensor_sumsq([t], 1, [0], torch.device("cpu"))
    assert sumsq.dtype == torch.float32
    assert math.isclose(sumsq.item(), 4096 * float(t[0]) ** 2, rel_tol=1e-5)


def test_nonfinite_counts():
    t = torch.zeros(10)
    t[[1, 4]] = float("nan")
    t[7] = float("-inf")
    assert stats.per_tensor_nonfinite([t, torch.ones(3)], 2, [0, 1], torch.device("cpu")).tolist() == [3.0, 0.0]


def test_group_reductions():
    index = torch.tensor([0, 1, 0, 2])
    values = torch.tensor([1.0, 2.0, 3.0, 4.0])
    assert stats.group_sum(values, index, 3).tolist() == [4.0, 2.0, 4.0]
    assert stats.group_max(values, index, 3).tolist() == [3.0, 2.0, 4.0]
    assert math.isnan(stats.group_max(torch.tensor([1.0, float("nan")]), torch.tensor([0, 0]), 1).item())


def test_histogram_of_finite_values_only():
    t = torch.tensor([0.0, 1.0, 2.0, 3.0, float("nan"), float("inf")])
    lo, neg_hi = stats.finite_range([t]).tolist()
    assert (lo, -neg_hi) == (0.0, 3.0)
    counted = stats.histogram_counts([t], lo, -neg_hi, bins=3)
    assert counted[:3].tolist() == [1.0, 1.0, 2.0]
    assert counted[3:].tolist() == [4.0, 6.0, 14.0]
    assert stats.histogram_edges(lo, -neg_hi, 3) == [0.0, 1.0, 2.0, 3.0]


def test_histogram_of_constant_values_has_a_width():
    edges = stats.histogram_edges(2.0, 2.0, 4)
    assert edges[0] == 2.0 and edges[-1] > 2.0
    assert stats.histogram_counts([torch.full((3,), 2.0)], 2.0, 2.0, 4)[:4].sum() == 3
    assert stats.finite_range([torch.tensor([float("nan")])]).tolist() == [math.inf, math.inf]


def test_kurtosis_survives_a_large_mean():
    g = torch.Generator().manual_seed(0)
    x = 100.0 + torch.randn(64, 32, 16, generator=g)
    computed = stats.activation_stats(*stats.activation_partials(x))
    x64 = x.double()
    expected = ((x64 - x64.mean()) ** 4).mean() / x64.var(unbiased=False) ** 2
    assert math.isclose(computed["kurtosis"], expected.item(), rel_tol=1e-6)
    assert math.isclose(computed["std"], x64.std(unbiased=False).item(), rel_tol=1e-6)


def test_activation_partials_add_up_over_parts():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(6, 5, 8, generator=g) * 3
    whole = stats.activation_stats(*stats.activation_partials(x))
    (s1, m1), (s2, m2) = stats.activation_partials(x[:2]), stats.activation_partials(x[2:])
    merged = stats.activation_stats(stats.add_activation_partials(s1, s2), torch.maximum(m1, m2))
    # Each part is centred on its own mean in float32, so the parts agree with the whole to float32 precision.
    assert all(math.isclose(merged[k], whole[k], rel_tol=1e-6) for k in whole), (merged, whole)
    # Partials about different means do not add as they are; moved to shift 0 they do, and say the same.
    assert s1[2] != s2[2]
    sums, maxes = stats.activation_partials(x)
    raw = stats.activation_partials_about_zero(sums)
    channel_sums = raw[stats.ACT_SCALARS : stats.ACT_SCALARS + x.shape[-1]]
    assert raw[2] == 0 and torch.allclose(channel_sums, x.double().sum(dim=(0, 1)), rtol=1e-6)
    assert stats.activation_stats(raw, maxes) == pytest.approx(whole, rel=1e-9)


def test_attention_entropy_of_uniform_and_one_hot_rows():
    rows = torch.tensor([[0.25, 0.25, 0.25, 0.25], [1.0, 0.0, 0.0, 0.0]])  # one head, two query rows
    partials = stats.attention_partials(rows.view(1, 1, 2, 4))
    assert stats.attention_stats(partials)["entropy_mean"] == pytest.approx(math.log(4) / 2, rel=1e-6)
    two_heads = torch.stack([rows, rows[[1, 1]]]).unsqueeze(0)  # head 1: one-hot rows only
    assert stats.attention_stats(stats.attention_partials(two_heads))["entropy_min"] == 0.0


def _weights_from_sdpa(q, k, **kwargs):
    """Per head mean entropy over the rows that have weights, from ``scaled_dot_product_attention`` itself in float64:
    with the identity as values its output is its weights."""
    keys = k.shape[-2]
    value = torch.eye(keys, dtype=torch.float64).expand(*k.shape[:-1], keys)
    weights = torch.nn.functional.scaled_dot_product_attention(q.double(), k.double(), value, **kwargs)
    if weights.dim() == 3:
        weights = weights.unsqueeze(1)
    has_weights = weights.sum(-1) > 0.5  # torch gives a row with every key masked zeros
    entropy = -torch.special.xlogy(weights, weights).sum(-1)  # [B, H, L]
    return entropy.sum(dim=(0, 2)) / has_weights.sum(dim=(0, 2))


def _max_logit_by_hand(q, k, attn_mask=None, is_causal=False, scale=None, enable_gqa=False):
    q, k = q.double(), k.double()
    if enable_gqa:
        k = k.repeat_interleave(q.shape[-3] // k.shape[-3], dim=-3)
    logits = q @ k.transpose(-2, -1) * (scale if scale is not None else q.shape[-1] ** -0.5)
    if attn_mask is not None:
        is_bool = attn_mask.dtype == torch.bool
        logits = logits.masked_fill(~attn_mask, float("-inf")) if is_bool else logits + attn_mask.double()
    if is_causal:
        logits = logits.masked_fill(torch.ones(logits.shape[-2:], dtype=torch.bool).triu(1), float("-inf"))
    return logits.max().item()


CASES = [
    "causal", "causal, fewer queries than keys", "boolean mask with a row of no keys", "float mask", "grouped keys",
    "one key head for all query heads", "a batch of one query sequence", "3-D, a mask per sequence", "[L, S] mask",
    "bfloat16", "under bfloat16 autocast",
]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("chunk", [None, 100, 5 * 24 * 24])  # all at once; 4 rows of one matrix; 5, 5 and 2 matrices
@pytest.mark.parametrize("entropy", ["eager", pytest.param("fused", marks=requires_compiler)])
def test_weights_of_a_scaled_dot_product_attention_call_formed_again(case, chunk, entropy, monkeypatch):
    if chunk:
        monkeypatch.setitem(stats._RECOMPUTE_CHUNK_VALUES, "cpu", chunk)
    g = torch.Generator().manual_seed(0)
    q, k = 2 * torch.randn(3, 4, 24, 8, generator=g), 2 * torch.randn(3, 4, 24, 8, generator=g)
    kwargs: dict = {}
    if case.startswith("causal"):
        kwargs["is_causal"] = True
        if "fewer" in case:
            q = q[:, :, :10]
    elif case.startswith("boolean"):
        mask = torch.rand(3, 1, 24, 24, generator=g) > 0.4
        mask[1, 0, 5] = False  # batch 1's query 5 attends to nothing: its row has no weights
        kwargs["attn_mask"] = mask
    elif case == "float mask":  # as Hugging Face builds its masks, plus a bias
        keep = torch.rand(1, 1, 24, 24, generator=g) > 0.3
        kwargs["attn_mask"] = torch.randn(1, 1, 24, 24, generator=g).masked_fill(~keep, torch.finfo(torch.float32).min)
    elif case == "grouped keys":
        k = k[:, :2]
        kwargs.update(enable_gqa=True, is_causal=True, scale=0.2)
    elif case == "one key head for all query heads":
        k = k[:, :1]
    elif case == "a batch of one query sequence":
        q = q[:1]
        kwargs["is_causal"] = True
    elif case.startswith("3-D"):
        q, k = q[:, 0], k[:, 0]
        kwargs["attn_mask"] = torch.rand(3, 24, 24, generator=g) > 0.3
    elif case == "[L, S] mask":
        kwargs["attn_mask"] = torch.rand(24, 24, generator=g) > 0.3
    else:  # formed in float32 from the bfloat16 values, as by hand in float64
        q, k = q.bfloat16(), k.bfloat16()
        kwargs["is_causal"] = True
    fused = stats.FusedStatistics()
    rows_entropy = fused._softmax_entropy if entropy == "fused" else None
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=case.startswith("under")):
        partials, logit_max = stats.scaled_dot_product_attention_partials(q, k, **kwargs, rows_entropy=rows_entropy)
    assert fused.failure is None
    per_head = _weights_from_sdpa(q, k, **kwargs)
    heads = per_head.numel()
    assert partials.dtype == torch.float64 and logit_max.dtype == torch.float32
    assert torch.allclose(partials[:heads] / partials[heads:], per_head, rtol=1e-6)
    assert logit_max.item() == pytest.approx(_max_logit_by_hand(q, k, **kwargs), rel=1e-6)
    if case.startswith("boolean"):
        assert partials[heads:].tolist() == [3 * 24 - 1] * heads  # the mask is shared by the heads
    expected = stats.attention_stats(torch.cat([per_head, torch.ones(heads, dtype=torch.float64)]))
    assert stats.attention_stats(partials) == pytest.approx(expected, rel=1e-6)


def test_weights_formed_again_agree_with_the_probabilities_path():
    g = torch.Generator().manual_seed(1)
    q, k = torch.randn(2, 3, 16, 8, generator=g), torch.randn(2, 3, 16, 8, generator=g)
    causal = torch.ones(16, 16, dtype=torch.bool).triu(1)
    probs = (q @ k.transpose(-2, -1) / 8**0.5).masked_fill(causal, float("-inf")).softmax(-1)
    partials, _ = stats.scaled_dot_product_attention_partials(q, k, is_causal=True)
    assert torch.allclose(partials, stats.attention_partials(probs), rtol=1e-6)


def _activation_with_every_feature() -> torch.Tensor:
    """An activation with a large mean channel, dead channels, exact zeros and an outlier channel."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(8, 64, 40, generator=g)
    x[..., 0] += 100.0
    x[..., 1:5] = -x[..., 1:5].abs()  # never above zero: dead
    x[..., 5] = 0.0
    x[..., 6] *= 20.0  # |x| >= 6 at most positions: an outlier feature
    return x


@requires_compiler
def test_fused_statistics_equal_the_eager_ones_and_a_float64_computation():
    """Compiled, each partial-sum function gives what its eager version gives (same layout, so the two mix across
    micro-batches and ranks), and the statistics equal an independent float64 computation."""
    fused = stats.FusedStatistics()
    x = _activation_with_every_feature()
    computed = stats.activation_stats(*fused.activation(x))
    eager = stats.activation_stats(*stats.activation_partials(x))
    x64 = x.double().reshape(-1, x.shape[-1])
    mean, var = x64.mean(), x64.var(unbiased=False)
    channel_ms = (x64 * x64).mean(0)
    expected = {
        "mean": mean.item(),
        "std": var.sqrt().item(),
        "rms": (x64 * x64).mean().sqrt().item(),
        "absmax": x64.abs().max().item(),
        "zero_frac": (x64 == 0).double().mean().item(),
        "dead_frac": 5 / 40,  # channels 1-4 and the zero channel 5
        "outliers": float(((x64.abs() >= 6).double().mean(0) >= 0.06).sum()),
        "channel_kurtosis": ((channel_ms**2).mean() / channel_ms.mean() ** 2).item(),
        "kurtosis": (((x64 - mean) ** 4).mean() / var**2).item(),
    }
    assert expected["outliers"] == 2.0  # the large-mean channel and the scaled one
    assert computed == pytest.approx(expected, rel=1e-6)
    assert computed == pytest.approx(eager, rel=1e-6)
    sums, maxes = fused.activation(x)
    eager_sums, eager_maxes = stats.activation_partials(x)
    assert sums.dtype == eager_sums.dtype and torch.equal(maxes, eager_maxes)
    # The same layout, element by element (the shift is each one's own float32 mean: equal to its last bits).
    assert torch.allclose(sums, eager_sums, rtol=1e-5, atol=1e-3)
    half = stats.add_activation_partials(fused.activation(x[:4])[0], stats.activation_partials(x[4:])[0])
    assert stats.activation_stats(half, maxes) == pytest.approx(computed, rel=1e-6)  # compiled and eager parts mix

    g = torch.Generator().manual_seed(4)
    causal = torch.ones(16, 16, dtype=torch.bool).triu(1)
    probs = torch.randn(3, 4, 16, 16, generator=g).masked_fill(causal, float("-inf")).softmax(-1)
    p64 = probs.double()
    per_head = -torch.xlogy(p64, p64).sum(-1).sum(dim=(0, 2))
    assert torch.allclose(fused.attention(probs)[:4], per_head, rtol=1e-6)
    assert torch.equal(fused.attention(probs)[4:], stats.attention_partials(probs)[4:])

    logits = torch.randn(3, 16, 50, generator=g) * 4
    lse_sq, logit_max = fused.logits(logits)
    assert lse_sq[0].item() == pytest.approx((torch.logsumexp(logits.double(), -1) ** 2).sum().item(), rel=1e-6)
    assert lse_sq[1].item() == 48 and logit_max.item() == logits.max().item()
    assert fused.failure is None


def test_a_statistic_that_cannot_compile_runs_eager(monkeypatch):
    """Where torch.compile fails (the CPU backend without a C++ compiler), the error is kept, the call returns the
    eager result, and no later call tries to compile again."""
    attempts = compiler_missing(monkeypatch)
    fused = stats.FusedStatistics()
    x = _activation_with_every_feature()
    sums, maxes = fused.activation(x)
    eager_sums, eager_maxes = stats.activation_partials(x)
    assert torch.equal(sums, eager_sums) and torch.equal(maxes, eager_maxes)
    assert fused.failure == "RuntimeError: InvalidCxxCompiler: No working C++ compiler found"
    fused.activation(x), fused.logits(x), stats.FusedStatistics().attention(x.softmax(-1).view(2, 4, 64, 40))
    assert attempts == ["fused_activation_partials"]  # once per process
    assert stats.FusedStatistics(compiled=False).activation(x)[0].equal(eager_sums)


def test_a_python_that_dynamo_does_not_support_runs_eager(monkeypatch):
    """``torch.compile`` itself raises where dynamo cannot run (a Python newer than the torch build): eager, kept."""
    def unsupported(fn, **kwargs):
        raise RuntimeError("torch.compile is not supported on Python 3.14+")

    monkeypatch.setattr(stats, "_COMPILED", {})
    monkeypatch.setattr(stats, "_COMPILE_FAILURE", [])
    monkeypatch.setattr(torch, "compile", unsupported)
    x = _activation_with_every_feature()
    assert torch.equal(stats.FusedStatistics().logits(x)[0], stats.logit_partials(x)[0])
    assert stats.FusedStatistics().failure == "RuntimeError: torch.compile is not supported on Python 3.14+"
