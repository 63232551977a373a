"""Schedule syntax: A1111's `learn_schedule.py` exactly, plus our 'last rate continues' rule."""

import pytest

from tinv_ui.errors import ConfigError
from tinv_ui.schedules import parse_schedule


@pytest.mark.parametrize(
    "text, initial, expected",
    [
        # examples checked against A1111's `LearnRateScheduler` (max_steps = 3000)
        ("0.005", 0, [(0.005, 3000)]),
        ("0.005:100, 1e-3:1000, 1e-5", 0, [(0.005, 100), (0.001, 1000), (1e-5, 3000)]),
        ("0.005:100, 1e-3:1000, 1e-5", 500, [(0.001, 1000), (1e-5, 3000)]),
        ("0.01:200, 0.001:-1", 0, [(0.01, 200), (0.001, 3000)]),
        # a bare rate or -1 ends parsing; later entries are ignored
        ("0.01:200, 0.001:-1, 5:4000", 0, [(0.01, 200), (0.001, 3000)]),
        ("0.01, 0.5:10", 0, [(0.01, 3000)]),
        # a step above max_steps is clamped and ends parsing
        ("0.01:200, 0.002:5000, 0.1:6000", 0, [(0.01, 200), (0.002, 3000)]),
        # empty entries are ignored; a step equal to the resume step is skipped
        ("0.01:200,, 0.002:300,", 0, [(0.01, 200), (0.002, 300)]),
        ("0.01:200, 0.002:300", 200, [(0.002, 300)]),
        # our rule: resumed past every pair, the last rate continues to max_steps (A1111 raised)
        ("0.01:200, 0.002:300", 700, [(0.002, 3000)]),
    ],
)
def test_a1111_table(text, initial, expected):
    assert list(parse_schedule(text, 3000, initial).pairs) == expected


def test_rate_at_switches_at_the_end_step_and_last_rate_continues():
    s = parse_schedule("0.005:100, 1e-3:1000", 3000)
    assert s.rate_at(0) == 0.005
    assert s.rate_at(99) == 0.005  # the 100th update still uses 0.005
    assert s.rate_at(100) == 0.001
    assert s.rate_at(999) == 0.001
    # A1111 would stop training at step 1000; we keep the last rate until max_steps
    assert s.rate_at(1000) == 0.001
    assert s.rate_at(2999) == 0.001
    assert "0.005 until step 100" in s.describe()


@pytest.mark.parametrize(
    "text, reason",
    [
        ("0.005:1e3", "not a whole number"),
        ("abc", "not a number"),
        ("", "empty"),
        (" , ", "empty"),
        ("0.1:10:20", "more than one"),
        ("0.1:0", "must be positive"),
        ("0.1:-5", "must be positive"),
        ("nan", "finite"),
        ("-0.1", ">= 0"),
        ("0.1:10.5", "not a whole number"),
    ],
)
def test_invalid_strings_name_the_field_and_show_an_example(text, reason):
    with pytest.raises(ConfigError) as e:
        parse_schedule(text, 3000, field_name="clip_grad_value")
    msg = str(e.value)
    assert msg.startswith("clip_grad_value")
    assert reason in msg
    assert "0.005:100, 1e-3:1000, 1e-5" in msg


def test_default_field_name_is_learn_rate():
    with pytest.raises(ConfigError, match=r"^learn_rate"):
        parse_schedule("x", 10)
