"""DDP and FSDP2 on CPU with 2 processes log the same per-group statistics as one process on the same global batch."""

from pathlib import Path

import pytest

from tests.helpers import assert_close, read_events, run_script, scalars

SCRIPT = Path(__file__).parent / "scripts" / "distributed_fit.py"


def _run(mode: str, out_dir: Path, timeout: float = 240) -> Path:
    run_script(SCRIPT, mode, out_dir, timeout=timeout)
    return out_dir / mode / "version_0"


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    return read_events(str(_run("single", tmp_path_factory.mktemp("single"))))


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_processes_log_the_single_process_statistics(mode, single, tmp_path):
    events = read_events(str(_run(mode, tmp_path)))
    tags = [t for t in single.Tags()["scalars"] if t.startswith("llmdbg/")]
    assert {t.split("/")[1] for t in tags} == {
        "grad_norm", "grad_absmax", "param_norm", "grad_nonfinite", "update_ratio", "act", "act_grad", "attn", "logits"
    }
    assert sorted(t for t in events.Tags()["scalars"] if t.startswith("llmdbg/")) == sorted(tags)
    for tag in tags:
        expected, logged = scalars(single, tag), scalars(events, tag)
        assert sorted(logged) == sorted(expected) == [0, 1, 2], tag
        for step, value in expected.items():
            if value == 0.0:
                assert logged[step] == 0.0, tag
            else:
                assert_close(logged[step], value, 1e-4, f"{mode} {tag}@{step}")
    assert sorted(events.Tags()["histograms"]) == sorted(single.Tags()["histograms"])
    for tag in single.Tags()["histograms"]:
        expected, logged = single.Histograms(tag), events.Histograms(tag)
        assert len(logged) == len(expected) == 3, tag
        for a, b in zip(expected, logged):
            assert a.histogram_value.num == b.histogram_value.num, tag  # every shard counted, none twice
            assert_close(b.histogram_value.max, a.histogram_value.max, 1e-4, tag)
            if tag.startswith("llmdbg/act_hist/"):  # fixed bins: the counts themselves must agree
                assert list(a.histogram_value.bucket) == list(b.histogram_value.bucket), tag


# -- attention entropy of weights formed again (a Hugging Face GPT-2 under SDPA attention) ---------------------------
def _run_hf(mode: str, out_dir: Path, *extra: str) -> tuple:
    output = run_script(SCRIPT, mode, out_dir, "--hf-sdpa", *extra, timeout=240)
    return read_events(str(out_dir / mode / "version_0")), output


@pytest.fixture(scope="module")
def hf_single(tmp_path_factory):
    return _run_hf("single", tmp_path_factory.mktemp("hf_single"))[0]


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_processes_log_the_single_process_entropy_of_sdpa_attention(mode, hf_single, tmp_path):
    events, _ = _run_hf(mode, tmp_path)
    tags = sorted(t for t in hf_single.Tags()["scalars"] if t.startswith("llmdbg/"))
    attention = [f"llmdbg/attn/transformer.h.{i}/{s}" for i in range(3) for s in ("entropy_mean", "entropy_min", "logit_max")]
    assert set(attention) <= set(tags)
    assert sorted(t for t in events.Tags()["scalars"] if t.startswith("llmdbg/")) == tags
    for tag in tags:
        expected, logged = scalars(hf_single, tag), scalars(events, tag)
        assert sorted(logged) == sorted(expected) == [0, 1, 2], tag
        for step, value in expected.items():
            assert_close(logged[step], value, 1e-4, f"{mode} {tag}@{step}")


def test_weights_that_cannot_be_formed_again_on_one_rank_stop_that_entropy_on_every_rank(tmp_path):
    """Rank 1 alone fails: no rank logs an entropy made of the other rank's weights only, and rank 0 says why."""
    events, output = _run_hf("ddp", tmp_path, "--fail-capture-on-rank", "1")
    tags = events.Tags()["scalars"]
    assert not [t for t in tags if t.startswith("llmdbg/attn/")]
    assert sorted(scalars(events, "llmdbg/act/transformer.h.2/rms")) == [0, 1, 2]  # training and the rest went on
    for i in range(3):
        assert f"'transformer.h.{i}' could not be recomputed" in output
    assert output.count("rank 1: RuntimeError: injected on rank 1") == 3 and "rank 0:" not in output
