"""The forward pass specialized to a model's weight types (kernels_cpu.specialize)."""
import ast
import os

import pytest

from kernels_cpu import formats as F
from kernels_cpu.dequant import dequant_row
from kernels_cpu.matvec_q8 import Q4_1_R, Q8_0_R, REPACKED, matvec_q8_part
from kernels_cpu.matmul_q8 import matmul_tiles_part
from kernels_cpu.specialize import _generated_path, forward_for, pruned_source


def branch_types(source: str) -> list[str]:
    """The type names the if-chains of the functions in source test for, in order."""
    return [n.comparators[0].id for n in ast.walk(ast.parse(source)) if isinstance(n, ast.Compare)]


def test_pruned_dispatch_keeps_only_the_given_types():
    source = pruned_source(matvec_q8_part, [Q8_0_R, Q4_1_R, F.Q6_K])
    assert branch_types(source) == ["Q4_1_R", "Q8_0_R", "Q6_K"]  # the original order
    assert "matvec_k16_part(raw, xq, xd, xs, out, Q6_K, u0, u1)" in source and "matvec_k4" not in source
    assert source.startswith("from kernels_cpu.matvec_q8 import ")
    tiles = pruned_source(matmul_tiles_part, [Q8_0_R, F.Q6_K])  # Q6_K (raw) has no tile kernel
    assert branch_types(tiles) == ["Q8_0_R"]
    only_q8 = pruned_source(dequant_row, [F.Q8_0])
    assert branch_types(only_q8) == ["Q8_0"] and "raise" not in only_q8


def test_unknown_types_are_refused():
    with pytest.raises(ValueError, match="1010"):
        forward_for([REPACKED + F.Q2_K, Q4_1_R], F.Q8_0)  # Q2_K has no repacked layout
    with pytest.raises(ValueError, match="99"):
        forward_for([Q4_1_R], 99)


def test_generated_module_is_written_once_and_reused():
    forward = forward_for([Q4_1_R, Q8_0_R], F.Q8_0)  # SmolLM2's types: the session fixture compiled it already
    path = _generated_path([Q4_1_R, Q8_0_R, -F.Q8_0])
    assert path.exists() and forward.py_func.__code__.co_filename == str(path)
    mtime = os.stat(path).st_mtime_ns
    assert forward_for([Q8_0_R, Q4_1_R], F.Q8_0) is forward
    assert os.stat(path).st_mtime_ns == mtime  # rewriting it would make Numba recompile
    # the matvec chain keeps Q4_1_R and Q8_0_R, the tile chain the same two, the embedding chain Q8_0
    assert sorted(branch_types(path.read_text().split("types only\n")[1])) == ["Q4_1_R", "Q4_1_R", "Q8_0",
                                                                                 "Q8_0_R", "Q8_0_R"]
