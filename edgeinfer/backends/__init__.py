"""Backends: what runs the decoder family's forward pass on a kind of hardware.

An architecture describes a model (a `DecoderConfig` and canonical weights, views into the memory map); a backend
prepares those weights for its kernels (`prepare_weights`) and runs the forward over a KV cache of sequences
(`edgeinfer.engine.Engine` drives it). The CPU backend is `cpu`: repacked 16-row layouts (edgeinfer.repacked,
cached on disk) and one compiled Numba forward (kernels_cpu.forward) whose tables `cpu_tables` builds.
"""
