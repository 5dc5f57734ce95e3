import pytest
from hypothesis import given
from hypothesis import strategies as st

from bigmodel import parse_size


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (0, 0),
        (123, 123),
        ("1.5GB", 1_500_000_000),
        (" 200 MB ", 200_000_000),
        ("5GiB", 5 * 2**30),
        ("5gib", 5 * 2**30),
        ("5gb", 5_000_000_000),
        ("10GB", 10_000_000_000),
        ("1KB", 1000),
        ("1KiB", 1024),
        ("2MiB", 2 * 2**20),
        ("1TB", 10**12),
        ("1TiB", 2**40),
        ("0.5kb", 500),
        (".5KB", 500),
        ("100", 100),
        ("100B", 100),
        ("1.0001KB", 1000),
    ],
)
def test_sizes_parse_to_bytes(value, expected):
    assert parse_size(value) == expected


@pytest.mark.parametrize(
    "value",
    ["abc", "-1GB", "1 G B", "GB", "", "1.2.3MB", "5 gigabytes", "1e3MB", -5, True, 1.5, None],
)
def test_invalid_sizes_raise_value_error_naming_the_value_and_units(value):
    with pytest.raises(ValueError, match="Invalid size") as info:
        parse_size(value)
    assert repr(value) in str(info.value)
    if isinstance(value, str):
        assert "GiB" in str(info.value)


@given(
    number=st.integers(min_value=0, max_value=10**6),
    unit=st.sampled_from(["B", "KB", "MB", "GB", "TB", "KiB", "MiB", "GiB", "TiB"]),
)
def test_integer_sizes_scale_by_their_unit_in_any_case(number, unit):
    factor = {
        "B": 1,
        "KB": 10**3,
        "MB": 10**6,
        "GB": 10**9,
        "TB": 10**12,
        "KiB": 2**10,
        "MiB": 2**20,
        "GiB": 2**30,
        "TiB": 2**40,
    }[unit]
    assert parse_size(f"{number}{unit}") == number * factor
    assert parse_size(f" {number} {unit.lower()} ") == number * factor
    assert parse_size(f"{number}{unit.upper()}") == number * factor
