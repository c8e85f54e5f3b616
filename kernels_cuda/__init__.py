"""CUDA kernels for the decoder family (numba-cuda), the device side of edgeinfer.backends.cuda.

- layout: every ggml weight type decoded once on the host into one exact form, int8 values with a float32 scale
  and offset per group (plain numpy);
- launch: the launch geometry (threads per row, rows per block), one for a real GPU and a small one for
  numba-cuda's simulator, where each thread is a Python thread;
- linear: activations quantized to int8 per 32 as the CPU does, int32 dots per group (dp4a: dot4), a tile of
  tokens x rows;
- ops: RMSNorm, RoPE, the gated activations, residual adds, embedding gather, logit post-processing;
- attention: K/V stores into the device cache (f32, f16, q8_0) and attention over it for any batch of
  (sequence, position) rows.

Nothing outside edgeinfer.backends.cuda imports this package, so importing edgeinfer never loads numba.cuda.
Every kernel the simulator tests launch is also compiled for sm_80 and sm_90 (NVVM, then ptxas) by
tests/test_cuda_compile.py, so code the simulator runs but CUDA refuses cannot land unnoticed.
Not here yet: packed 4-bit weights on the device, tuned tile sizes; no figures from a real GPU.
"""
