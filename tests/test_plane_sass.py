"""benchmarks/plane_sass.py: the offline instruction count finds the plane kernel's tile loop (its tensor-core
products inside it) for the specialised launch; the counts themselves are a benchmark, not a test."""

from __future__ import annotations

import importlib.util

import pytest

from kvbench import kernels
from tests.conftest import REPO


def test_the_tile_loop_is_found_with_its_products() -> None:
    pytest.importorskip("triton.backends.nvidia")
    if kernels._INTERPRETED:
        pytest.skip("TRITON_INTERPRET is set: the kernels are interpreted functions")
    spec = importlib.util.spec_from_file_location("plane_sass", REPO / "benchmarks" / "plane_sass.py")
    plane_sass = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(plane_sass)
    measured = plane_sass.measure(plane_sass.compile_plane("token", "zero_sums", num_warps=2))
    assert measured["loop"] > 100 and measured["classes"].get("mma", 0) >= 16, measured
    assert measured["registers"] > 0
