"""splatdd.checks: positive integers pass through as ints, everything else is refused with a
message naming the argument."""
import doctest

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from splatdd import checks
from splatdd.checks import positive_int


@settings(deadline=None)
@given(st.integers(min_value=1, max_value=2**62))
def test_positive_ints_pass_through(n):
    assert positive_int("n", n) == n
    assert positive_int("n", np.int64(n)) == n and type(positive_int("n", np.int64(n))) is int
    assert positive_int("n", n, allow_none=True) == n


@settings(deadline=None)
@given(st.one_of(st.integers(max_value=0), st.floats(allow_nan=True), st.booleans(),
                 st.text(max_size=3), st.none()))
def test_everything_else_is_refused_by_name(bad):
    with pytest.raises(ValueError, match=r"^my_arg must be a positive integer, got "):
        positive_int("my_arg", bad)


def test_none_only_when_allowed():
    assert positive_int("chunk", None, allow_none=True) is None
    with pytest.raises(ValueError, match="chunk must be a positive integer or None, got 0"):
        positive_int("chunk", 0, allow_none=True)


def test_doctests():
    result = doctest.testmod(checks, raise_on_error=False)
    assert result.attempted >= 3 and result.failed == 0
