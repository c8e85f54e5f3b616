"""Launch geometry of the CUDA kernels: how many threads share a row, how many rows a block holds.

The kernels read their geometry from the launch (blockDim), never from constants, so one kernel serves both
geometries below; the shared arrays are sized for the largest block (MAX_BLOCK_THREADS) and the host checks fit.
- On a GPU: a warp (32 lanes) per output row, splitting its groups (coalesced: lane l reads group l's bytes, the
  next lane the next group's), 4 rows per block; attention splits one row's keys across 32 lanes.
- In numba-cuda's simulator every thread is a Python thread and each syncthreads() costs milliseconds per block:
  one block of a few threads, each looping over many rows or elements (the kernels' grid-stride loops), keeps the
  few tests that run there fast. The kernel tests launch the
  GPU-like geometries too (several lanes per row), so the reductions are checked on every run.
"""
from __future__ import annotations

from dataclasses import dataclass

from numba.core import config

MAX_BLOCK_THREADS = 256  # lanes x rows of any reduction kernel's block (sizes its shared arrays)
TOKEN_TILE = 8  # tokens (activation rows) one block of a linear kernel multiplies at once
MAX_HEAD_DIM = 256  # longest key / value head a thread of the attention kernel holds in local arrays
ATTENTION_SHARED = 8192  # float32 values of partial sums the attention kernel merges per block (key lanes x heads x d_v)


@dataclass(frozen=True)
class Geometry:
    """Threads per block of each kind of kernel (each of lanes, key_lanes a power of two)."""

    lanes: int  # threads splitting one row's reduction (linear, RMSNorm)
    rows: int  # rows per block of those kernels
    key_lanes: int  # attention: threads splitting one (row, head)'s keys
    heads: int  # attention: query heads per block (fewer when d_v would overflow ATTENTION_SHARED)
    threads: int  # element-wise kernels: threads per block
    max_blocks: int  # blocks of a launch at most: kernels loop (grid-stride) over what more blocks would have taken

    def __post_init__(self):
        for name in ("lanes", "key_lanes"):
            value = getattr(self, name)
            if value < 1 or value & (value - 1):
                raise ValueError(f"{name}={value} must be a power of two")
        if self.lanes * self.rows > MAX_BLOCK_THREADS or self.key_lanes * self.heads > MAX_BLOCK_THREADS:
            raise ValueError(f"a block of more than {MAX_BLOCK_THREADS} threads")


GPU = Geometry(lanes=32, rows=4, key_lanes=32, heads=1, threads=256, max_blocks=1 << 16)
SIMULATOR = Geometry(lanes=1, rows=32, key_lanes=1, heads=16, threads=8, max_blocks=1)


def simulated() -> bool:
    """Whether numba.cuda is numba-cuda's simulator (NUMBA_ENABLE_CUDASIM=1) rather than a device."""
    return bool(config.ENABLE_CUDASIM)


def default_geometry() -> Geometry:
    return SIMULATOR if simulated() else GPU


def blocks(n: int, per_block: int, geometry: Geometry | None = None) -> int:
    """Blocks of per_block that cover n (at least 1: a grid of 0 blocks is an error), at most geometry.max_blocks."""
    needed = max(1, (n + per_block - 1) // per_block)
    return min(needed, geometry.max_blocks) if geometry is not None else needed
