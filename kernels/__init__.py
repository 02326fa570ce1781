"""Triton kernels of amips and their torch references (installed as ``amips.kernels``).

Pure compute: no file I/O, no training logic, and no imports from the rest of amips.
Each operation lives in one file: the maths in the docstring, the ``@triton.jit`` kernel,
the torch reference ``<op>_ref`` (CPU fallback and oracle), and the launcher ``<op>``.
"""

from ._backend import triton_available, use_triton

__all__ = ["triton_available", "use_triton"]
