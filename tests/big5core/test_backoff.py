import itertools

from big5core.backoff import backoff_delay, backoff_delays


def test_the_delays_double_up_to_the_cap() -> None:
    assert list(itertools.islice(backoff_delays(1.0, 30.0), 7)) == [1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0]
    assert [backoff_delay(step, 0.5, 3.0) for step in range(5)] == [0.5, 1.0, 2.0, 3.0, 3.0]
