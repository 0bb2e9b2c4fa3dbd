"""reflexflow.checks: the shared argument checks name the argument and what was expected."""

from __future__ import annotations

import math

import pytest

from reflexflow.checks import check_bool, check_choice, check_number


def test_check_number_refuses_bools_strings_and_non_finite_values_naming_the_argument():
    with pytest.raises(TypeError, match="lambda_fc must be a number, got True"):
        check_number("lambda_fc", True)
    with pytest.raises(TypeError, match="k must be an int, got 2.0"):
        check_number("k", 2.0, integer=True)
    with pytest.raises(TypeError, match="shift must be a number, got '3'"):
        check_number("shift", "3")
    for bad in (math.nan, math.inf, -math.inf):
        with pytest.raises(ValueError, match="std must be finite"):
            check_number("std", bad)


def test_check_number_bounds_are_closed_unless_low_open():
    check_number("t", 0.0, low=0, high=1)
    check_number("t", 1.0, low=0, high=1)
    with pytest.raises(ValueError, match="t must be > 0, got 0.0"):
        check_number("t", 0.0, low=0, low_open=True)
    with pytest.raises(ValueError, match="t must be >= 0, got -0.5"):
        check_number("t", -0.5, low=0)
    with pytest.raises(ValueError, match="t must be <= 1, got 1.5"):
        check_number("t", 1.5, high=1)


def test_check_bool_refuses_integers_and_takes_none_only_when_optional():
    check_bool("flag", False)
    check_bool("flag", None, optional=True)
    with pytest.raises(TypeError, match="flag must be a bool, got 1"):
        check_bool("flag", 1)
    with pytest.raises(TypeError, match="flag must be a bool or None, got 'yes'"):
        check_bool("flag", "yes", optional=True)


def test_check_choice_lists_the_choices():
    check_choice("memory", "lean", ("default", "lean"))
    with pytest.raises(ValueError, match=r"memory must be one of \('default', 'lean'\), got 'x'"):
        check_choice("memory", "x", ("default", "lean"))
