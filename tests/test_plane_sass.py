"""benchmarks/plane_sass.py: the offline instruction count finds the plane kernel's tile loop (its tensor-core
products inside it) for the specialised launch; the counts themselves are a benchmark, not a test."""

from __future__ import annotations

import collections
import importlib.util

import pytest

from kvbench import kernels
from tests.conftest import REPO


@pytest.fixture(scope="module")
def plane_sass():
    """benchmarks/plane_sass.py as a module, where Triton compiles for NVIDIA (not under its interpreter)."""
    pytest.importorskip("triton.backends.nvidia")
    if kernels._INTERPRETED:
        pytest.skip("TRITON_INTERPRET is set: the kernels are interpreted functions")
    spec = importlib.util.spec_from_file_location("plane_sass", REPO / "benchmarks" / "plane_sass.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_tile_loop_is_found_with_its_products(plane_sass) -> None:
    measured = plane_sass.measure(plane_sass.compile_plane("token", "zero_sums", num_warps=2))
    assert measured["loop"] > 100 and measured["classes"].get("mma", 0) >= 16, measured
    assert measured["registers"] > 0


def test_the_tile_loops_instructions_are_attributed_to_source_lines(plane_sass) -> None:
    """`--lines`: every instruction of the largest loop, class by class, goes to a source line, the products
    to the kernel's own file. Mode "rows" at 2 bits with the window has two loops, the second the larger."""
    measured = plane_sass.measure(plane_sass.compile_plane("rows", "default", num_warps=2, bits=2, window=True))
    assert len(measured["loops"]) == 2 and measured["loops"][1][0] > measured["loops"][0][0], measured["loops"]
    attributed = sum((classes for classes in measured["sources"].values()), collections.Counter())
    assert dict(attributed) == measured["classes"]
    products = sum(c.get("mma", 0) for (file, _), c in measured["sources"].items() if file == "plane_kernel.py")
    assert products == measured["classes"]["mma"]
