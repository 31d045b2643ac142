"""The array helpers that keep result encoding fast on a 300-slice volume give the same
answers as the plain whole-volume computations, and the worker's warm-up loads what the
first SEG/SR would otherwise load."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from node.results.seg import occupied_slices, segment_map
from node.results.sr import bounding_box

ROOT = Path(__file__).resolve().parents[2]


def _sparse(dtype: Any, seed: int = 3) -> np.ndarray:
    rng = np.random.default_rng(seed)
    labels = np.zeros((12, 9, 10), dtype=dtype)
    labels[4:7, 2:6, 3:8] = rng.integers(0, 4, size=(3, 4, 5)).astype(dtype)
    labels[10, 8, 9] = 2
    return labels


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.bool_, np.int16, np.float32])
def test_occupied_slices_are_the_slices_with_any_non_zero(dtype: Any) -> None:
    labels = _sparse(np.uint8).astype(dtype)
    if dtype in (np.int16, np.float32):
        labels[1, 0, 0] = -1          # a maximum of 0 must not hide a negative value
    expected = labels.reshape(labels.shape[0], -1).any(axis=1)
    np.testing.assert_array_equal(occupied_slices(labels), expected)
    assert not occupied_slices(np.zeros((0, 4, 4), dtype=dtype)).size


@pytest.mark.parametrize("values", [[1], [1, 2, 3], [2], [3, 1], [2, 3]])
def test_segment_map_numbers_the_given_values_and_zeroes_the_rest(values: list[int]) -> None:
    labels = _sparse(np.uint8)
    expected = np.zeros(labels.shape, dtype=np.uint8)
    for number, value in enumerate(values, start=1):
        expected[labels == value] = number
    if not set(np.unique(labels)) - {0} - set(values) and values == [1, 2, 3][:len(values)]:
        # labels already numbered 1..N: the map is the label array itself, not a copy
        assert np.shares_memory(segment_map(labels, values), labels)
    np.testing.assert_array_equal(segment_map(labels, values), expected)
    signed = labels.astype(np.int16) - 1           # background -1, labels 0..2
    got = segment_map(signed, [v - 1 for v in values if v - 1 > 0])
    want = np.zeros(labels.shape, dtype=np.uint8)
    for number, value in enumerate([v - 1 for v in values if v - 1 > 0], start=1):
        want[signed == value] = number
    np.testing.assert_array_equal(got, want)


def test_bounding_box_holds_every_voxel_and_nothing_more() -> None:
    mask = _sparse(np.uint8) > 0
    box = bounding_box(mask)
    assert box == (slice(4, 11), slice(2, 9), slice(3, 10))
    assert np.count_nonzero(mask[box]) == np.count_nonzero(mask)
    assert bounding_box(np.zeros((3, 3, 3), dtype=bool)) is None


def test_warm_up_loads_highdicom_tables_and_builds_both_objects() -> None:
    code = ("from highdicom._standard_utils import get_module_attribute_map as m; "
            "before = m.cache_info().currsize; "
            "from node.results.warm import warm_up; seconds = warm_up(); "
            "print(before, m.cache_info().currsize, seconds > 0)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=ROOT, check=True, timeout=120).stdout.split()
    assert out == ["0", "1", "True"]
