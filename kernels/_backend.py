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
    import triton  # noqa: F401
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


def launch_or_fallback(kernel_name: str, launch, fallback):
    """Run ``launch()``; if the Triton kernel fails to compile or launch, run ``fallback()``.

    Only on real devices: under the interpreter, or with ``AMIPS_BACKEND=triton``, errors
    propagate (tests must see them). Each fallback emits one ``RuntimeWarning`` naming the
    kernel and the compiler's error, and is recorded in :func:`fallback_events` so that
    benchmarks and ``bench/gpu_check.py`` count it as a failure.
    """
    import warnings

    strict = interpreter_on() or os.environ.get("AMIPS_BACKEND", "").strip().lower() == "triton"
    if strict:
        return launch()
    try:
        return launch()
    except Exception as exc:  # noqa: BLE001 - any compile/launch error; reported below
        msg = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
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
