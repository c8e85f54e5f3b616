"""Compile every CUDA kernel specialization the simulator tests launched (tools.cuda_capture's record) for real
GPUs, without a GPU: NVVM makes PTX, then ptxas (where the toolkit has it) assembles it for the target, as the driver
would at load time. `python -m tools.cuda_compile_check CAPTURE [--cc 8.0,9.0]` prints one line per kernel and
target and exits 1 if any fails. Needs numba-cuda with the CUDA toolkit wheels (NVVM, NVRTC, ptxas: pip install
'edgeinfer[cuda]'), and no driver.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path


def find_ptxas() -> str | None:
    """ptxas from the nvidia-cuda-nvcc wheel, else from PATH; None if neither has it."""
    try:
        import nvidia.cuda_nvcc
        candidate = Path(next(iter(nvidia.cuda_nvcc.__path__))) / "bin" / "ptxas"
        if candidate.is_file():
            return str(candidate)
    except ImportError:
        pass
    return shutil.which("ptxas")


def assemble(ptxas: str, ptx: str, cc: tuple[int, int]) -> str | None:
    """ptxas's complaint about the PTX for sm_{cc}, or None if it assembles."""
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / "kernel.ptx"
        source.write_text(ptx)
        done = subprocess.run([ptxas, f"-arch=sm_{cc[0]}{cc[1]}", str(source), "-o", str(Path(tmp) / "kernel.cubin")],
                              capture_output=True, text=True)
        return None if done.returncode == 0 else (done.stderr or done.stdout).strip()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("capture", help="JSON lines from tools.cuda_capture")
    parser.add_argument("--cc", default="8.0,9.0", help="compute capabilities to compile for (comma-separated)")
    args = parser.parse_args(argv)
    os.environ["NUMBA_ENABLE_CUDASIM"] = "0"  # before numba.cuda is imported: the real compiler
    from numba import cuda, types  # noqa: F401 (types: the namespace the recorded type texts are read in)

    ccs = [tuple(int(p) for p in cc.split(".")) for cc in args.cc.split(",")]
    with open(args.capture) as f:
        records = [json.loads(line) for line in f if line.strip()]
    if not records:
        print(f"{args.capture}: no kernel launches recorded", file=sys.stderr)
        return 1
    ptxas = find_ptxas()
    if ptxas is None:
        print("ptxas not found: the PTX is made but not assembled", file=sys.stderr)
    failures = 0
    namespace = {name: getattr(types, name) for name in dir(types)}
    for record in records:
        kernel = getattr(importlib.import_module(record["module"]), record["kernel"])
        signature = tuple(eval(t, namespace) for t in record["args"])  # noqa: S307 (our own record's type texts)
        name = f"{record['module']}.{record['kernel']}({', '.join(record['args'])})"
        for cc in ccs:
            try:
                ptx, _ = cuda.compile_ptx(kernel.py_func, signature, cc=cc)
            except Exception as e:  # noqa: BLE001 (every failure is reported, then the exit status says so)
                failures += 1
                print(f"FAIL sm_{cc[0]}{cc[1]} {name}: {type(e).__name__}: {str(e).splitlines()[0][:300]}")
                continue
            complaint = assemble(ptxas, ptx, cc) if ptxas else None
            if complaint:
                failures += 1
                print(f"FAIL sm_{cc[0]}{cc[1]} {name}: ptxas: {complaint.splitlines()[0][:300]}")
                continue
            dp4a = sum("dp4a" in line for line in ptx.splitlines())
            print(f"ok   sm_{cc[0]}{cc[1]} {name}: {len(ptx.splitlines())} lines of PTX"
                  f"{', assembled' if ptxas else ''}{f', {dp4a} dp4a' if dp4a else ''}")
    print(f"{len(records)} specializations x {len(ccs)} targets: {failures} failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
