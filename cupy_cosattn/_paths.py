"""Where the CUDA sources live: cuda_src/ beside the package in a source tree, or the copy installed
inside the package (cupy_cosattn/cuda_src) by a wheel."""
from pathlib import Path

_here = Path(__file__).resolve().parent
CUDA_SRC = _here.parent / "cuda_src" if (_here.parent / "cuda_src" / "common.cuh").exists() else _here / "cuda_src"


def read_source(name: str) -> str:
    """Text of cuda_src/<name>."""
    return (CUDA_SRC / name).read_text()
