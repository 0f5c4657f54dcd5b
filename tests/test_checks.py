"""The one integer check every public function uses (``dafusion_aug._checks``)."""

from __future__ import annotations

import numpy as np
import pytest

from dafusion_aug._checks import check_int


@pytest.mark.parametrize("value", [3, np.int64(3), np.uint8(3)])
def test_integers_of_any_type_come_back_as_python_ints(value):
    out = check_int(value, "n", minimum=1)
    assert out == 3 and type(out) is int


@pytest.mark.parametrize("value, shown", [(True, "bool: True"), (2.0, "float: 2.0"), ("2", "str: '2'"), (None, "NoneType: None")])
def test_non_integers_are_type_errors_naming_argument_and_value(value, shown):
    with pytest.raises(TypeError, match=f"^steps must be an int, got {shown}$"):
        check_int(value, "steps", minimum=1)


def test_below_the_minimum_is_a_value_error_with_the_unit():
    assert check_int(0, "grow", minimum=0, unit="pixels") == 0
    with pytest.raises(ValueError, match=r"^grow must be an int >= 0 \(pixels\), got -1$"):
        check_int(-1, "grow", minimum=0, unit="pixels")
    with pytest.raises(TypeError, match=r"^grow must be an int \(pixels\), got float: 0.5$"):
        check_int(0.5, "grow", unit="pixels")
    assert check_int(-5, "seed") == -5  # no minimum
