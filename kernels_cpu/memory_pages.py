"""Map the pages of a new array now, not at first use.

A large numpy array of zeros is only reserved address space: the OS maps (and zeroes) each page at its first write,
and with transparent huge pages a first write anywhere in 2 MB maps all of it. A KV cache laid out by (layer,
sequence, head, position) is touched at the start of every (layer, sequence, head) region by a sequence's first
tokens, so a server's first burst of requests mapped nearly the whole cache at once: 1.6 GB (SmolLM2, 8 slots of 8192
positions) held every first token of that burst for 1.8-2.6 s (time to first token, p99, on a 2-vCPU VM). Mapping the
pages while the server loads, as llama.cpp clears its KV buffer at creation, moves that cost before it is ready.
"""
import numpy as np
from numba import njit, prange

from kernels_cpu.kernel_thread import call_with_threads

PAGE = 4096  # bytes: one write per small page maps it (and its huge page, where it has one)


@njit(cache=True, parallel=True)
def _zero_one_byte_per_page(flat, page):
    for i in prange((flat.shape[0] + page - 1) // page):
        flat[i * page] = 0


def zero_pages(array: np.ndarray, n_threads: int = 1) -> None:
    """Write 0 to one byte of every page of a C-contiguous array (an array of zeros stays all zeros, its pages all
    mapped), n_threads threads faulting pages in side by side."""
    if not array.flags.c_contiguous:
        raise ValueError("zero_pages needs a C-contiguous array")
    if array.size:
        call_with_threads(n_threads, _zero_one_byte_per_page, array.reshape(-1).view(np.uint8), PAGE)
