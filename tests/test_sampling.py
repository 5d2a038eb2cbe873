import pytest

from lightning_llmdbg.sampling import SamplingSchedule


def test_every_n_with_warmup():
    schedule = SamplingSchedule(every_n_steps=10, warmup_steps=4)
    assert [s for s in range(35) if schedule.is_sampled(s)] == [0, 1, 2, 3, 10, 20, 30]


def test_every_step():
    schedule = SamplingSchedule(every_n_steps=1)
    assert all(schedule.is_sampled(s) for s in range(50))


@pytest.mark.parametrize("bad", [0, -3, 2.5, True, "5"])
def test_bad_interval_names_the_value(bad):
    with pytest.raises(ValueError, match=repr(bad).replace(".", r"\.")):
        SamplingSchedule(every_n_steps=bad)


def test_bad_warmup_names_the_value():
    with pytest.raises(ValueError, match="-1"):
        SamplingSchedule(every_n_steps=5, warmup_steps=-1)
