"""Backend selection shared by every kernel launcher.

A launcher runs its Triton kernel when the tensors live on a CUDA device, or on CPU
tensors when ``TRITON_INTERPRET=1`` (Triton's interpreter, used by the tests). Otherwise it
runs the torch reference. ``AMIPS_BACKEND=torch`` or ``AMIPS_BACKEND=triton`` forces one
backend for debugging (``triton`` on CPU needs the interpreter).
"""

from __future__ import annotations

import os

import torch

try:  # Triton ships for Linux only; amips still works (torch paths) without it.
    import triton
    import triton.language as tl  # noqa: F401

    _HAVE_TRITON = True
except Exception:  # pragma: no cover - depends on the platform
    _HAVE_TRITON = False


def triton_available() -> bool:
    return _HAVE_TRITON


def interpreter_on() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def use_triton(*tensors: torch.Tensor) -> bool:
    """Whether a launcher given ``tensors`` should run its Triton kernel."""
    forced = os.environ.get("AMIPS_BACKEND", "").strip().lower()
    if forced not in ("", "torch", "triton"):
        raise ValueError(f"AMIPS_BACKEND must be 'torch' or 'triton', got {forced!r}")
    if forced == "torch" or not _HAVE_TRITON:
        if forced == "triton" and not _HAVE_TRITON:
            raise RuntimeError("AMIPS_BACKEND=triton but triton is not installed")
        return False
    on_cuda = all(t.is_cuda for t in tensors)
    if on_cuda:
        return True
    if interpreter_on():
        return True
    if forced == "triton":
        raise RuntimeError(
            "AMIPS_BACKEND=triton with CPU tensors needs TRITON_INTERPRET=1 set before import"
        )
    return False


# --- CUDA fallback: a kernel that fails to compile or launch never hides -----------------

_FALLBACKS: list[dict] = []
_STRICT = False


class KernelFailure(RuntimeError):
    """Raised inside a launch closure for a kernel result that proves the kernel broken (a
    NaN the maths cannot produce, say): handled like a compile or launch failure."""


class KernelFallbackError(RuntimeError):
    """A Triton kernel failed to compile or launch while fallbacks are forbidden (strict)."""

    def __init__(self, kernel_name: str, message: str):
        super().__init__(f"Triton kernel {kernel_name} failed to compile or launch ({message}); "
                         f"strict mode forbids the torch fallback")
        self.kernel_name = kernel_name


def set_strict(on: bool) -> None:
    """Strict mode: a kernel that fails to compile or launch raises
    :class:`KernelFallbackError` instead of falling back (also ``AMIPS_STRICT_KERNELS=1``).
    Benchmarks and the GPU check run strict, so a row never measures the torch path."""
    global _STRICT
    _STRICT = bool(on)


def strict() -> bool:
    return _STRICT or os.environ.get("AMIPS_STRICT_KERNELS", "").strip() not in ("", "0")


def _raised_by_triton(exc: BaseException) -> bool:
    """Whether ``exc`` came out of Triton itself (compiler, launcher build, launch), or is a
    :class:`KernelFailure`: only those may fall back. Errors of the torch code around the
    launch (grouping, allocation, top-k) and out-of-memory errors always propagate."""
    if isinstance(exc, KernelFailure):
        return True
    if isinstance(exc, (MemoryError, torch.cuda.OutOfMemoryError)) or not _HAVE_TRITON:
        return False
    if type(exc).__module__.split(".")[0] == "triton":  # CompilationError, OutOfResources, ...
        return True
    root = os.path.dirname(os.path.abspath(triton.__file__)) + os.sep
    tb = exc.__traceback__
    while tb is not None:
        if os.path.abspath(tb.tb_frame.f_code.co_filename).startswith(root):
            return True
        tb = tb.tb_next
    return False


def launch_or_fallback(kernel_name: str, launch, fallback):
    """Run ``launch()``; if the Triton kernel fails to compile or launch, run ``fallback()``.

    Only failures raised inside Triton (or a :class:`KernelFailure`) fall back; any other
    exception of ``launch`` propagates unchanged. Only on real devices: under the
    interpreter, or with ``AMIPS_BACKEND=triton``, errors propagate (tests must see them);
    in strict mode (:func:`set_strict`, ``AMIPS_STRICT_KERNELS=1``) a failure raises
    :class:`KernelFallbackError` naming the kernel. Otherwise each fallback emits one
    ``RuntimeWarning`` naming the kernel and the compiler's error, and is recorded in
    :func:`fallback_events` so that benchmarks and ``bench/gpu_check.py`` count it as a
    failure.
    """
    import warnings

    if interpreter_on() or os.environ.get("AMIPS_BACKEND", "").strip().lower() == "triton":
        return launch()
    try:
        return launch()
    except Exception as exc:  # noqa: BLE001 - filtered below: only Triton's own failures
        if not _raised_by_triton(exc):
            raise
        text = str(exc).strip()
        msg = f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"
        if strict():
            raise KernelFallbackError(kernel_name, msg) from exc
        _FALLBACKS.append({"kernel": kernel_name, "error": msg})
        warnings.warn(
            f"amips: Triton kernel {kernel_name} failed ({msg}); using the torch path instead",
            RuntimeWarning,
            stacklevel=2,
        )
        return fallback()


def fallback_events() -> list[dict]:
    """Every fallback since the process started (or since :func:`clear_fallback_events`)."""
    return list(_FALLBACKS)


def clear_fallback_events() -> None:
    _FALLBACKS.clear()
