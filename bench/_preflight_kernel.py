"""The one tiny Triton kernel the GPU check's preflight compiles and launches.

A module of its own: Triton's JIT resolves a kernel's names through its module globals, so
the kernel must not be defined inside a function. Imported only after the environment
(``TRITON_INTERPRET`` for the CPU smoke run) is set.
"""

import triton
import triton.language as tl


@triton.jit
def _preflight_axpy(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    tl.store(y_ptr + offs, 2.0 * tl.load(x_ptr + offs, mask=mask) + 1.0, mask=mask)


def launch(x, y) -> None:
    n = x.numel()
    _preflight_axpy[(triton.cdiv(n, 256),)](x, y, n, BLOCK=256)
