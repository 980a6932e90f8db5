"""When the driver's long waits say they are still waiting (actors/waiting.py)."""
from __future__ import annotations

import itertools

from actors.waiting import report_times, waited


def test_report_times_double_their_interval_up_to_the_ceiling():
    assert list(itertools.islice(report_times(), 6)) == [5, 15, 35, 75, 155, 315]
    # Past the ceiling (300 s) the lines come every 300 s, however long the wait.
    times = list(itertools.islice(report_times(), 12))
    assert [b - a for a, b in zip(times[6:], times[7:])] == [300] * 5
    assert list(itertools.islice(report_times(first_s=1.0, max_s=4.0), 5)) == [1, 3, 7, 11, 15]


def test_waited_reads_as_a_person_writes_it():
    assert [waited(s) for s in (0.4, 5, 59.6, 200, 3599, 3900)] == ["0s", "5s", "1m00s", "3m20s", "59m59s", "1h05m"]
