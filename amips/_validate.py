"""Input checks shared by every public function: clear errors that name the argument."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

_FLOAT_TORCH = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_INT_TORCH = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)


class InputError(ValueError):
    """Bad input to a public amips function or CLI command."""


def to_tensor(x: Any, name: str) -> torch.Tensor:
    """numpy array (memory-mapped too) or torch tensor -> torch tensor, without copying.

    Integer arrays are accepted and upcast to float64 (exact for |value| < 2**53): the
    one integer-input policy of amips, the same for files, numpy arrays and tensors
    (``docs/errors.md``). bool, complex and object arrays are refused.
    """
    if isinstance(x, torch.Tensor):
        return x
    if isinstance(x, np.ndarray):
        if x.dtype.kind in "iu":
            return torch.from_numpy(np.asarray(x, dtype=np.float64))
        if x.dtype.kind not in "f":
            raise InputError(f"{name}: expected a floating-point or integer array, got dtype {x.dtype}")
        if x.dtype.itemsize > 8:
            x = np.asarray(x, dtype=np.float64)  # long double: torch has no such dtype
        if not (x.flags.writeable and x.flags.c_contiguous):
            x = np.array(x, order="C")  # read-only memmaps and strided views are copied
        return torch.from_numpy(x)
    raise InputError(f"{name}: expected a numpy array or a torch tensor, got {type(x).__name__}")


def check_matrix(
    x: torch.Tensor,
    name: str,
    *,
    dim: int | None = None,
    finite: bool = True,
    allow_empty: bool = False,
) -> torch.Tensor:
    """Check a 2-D matrix [n, d]; fp16/bf16 are accepted (upcast by callers), integer
    tensors are upcast to float64 (the integer-input policy, see :func:`to_tensor`)."""
    if x.dtype in _INT_TORCH:
        x = x.double()
    if x.dtype not in _FLOAT_TORCH:
        raise InputError(f"{name}: expected a floating-point or integer tensor, got dtype {x.dtype}")
    if x.dim() != 2:
        raise InputError(f"{name}: expected a 2-D array [n, d], got shape {tuple(x.shape)}")
    if not allow_empty and (x.shape[0] == 0 or x.shape[1] == 0):
        raise InputError(f"{name}: is empty (shape {tuple(x.shape)})")
    if dim is not None and x.shape[1] != dim:
        raise InputError(
            f"{name}: dimension mismatch, expected d = {dim}, got shape {tuple(x.shape)}"
        )
    if finite and not all_finite(x):
        raise InputError(f"{name}: contains NaN or inf values")
    return x


def all_finite(x: torch.Tensor) -> bool:
    """True when no element is NaN or inf (one streaming pass in the common case)."""
    if x.numel() == 0:
        return True
    # NaN and inf propagate through a sum; an overflowing sum of finite values is re-checked.
    if bool(torch.isfinite(x.sum(dtype=torch.float64))):
        return True
    return bool(torch.isfinite(x).all())


def check_same_device(**tensors: torch.Tensor) -> torch.device:
    devices = {n: t.device for n, t in tensors.items()}
    first = next(iter(devices.values()))
    for n, dev in devices.items():
        if dev != first:
            listing = ", ".join(f"{k} on {v}" for k, v in devices.items())
            raise InputError(f"{n}: tensors are on different devices ({listing})")
    return first


def check_positive_int(value: Any, name: str, *, maximum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise InputError(f"{name}: expected an integer, got {value!r}")
    value = int(value)
    if value < 1:
        raise InputError(f"{name}: must be >= 1, got {value}")
    if maximum is not None and value > maximum:
        raise InputError(f"{name}: must be <= {maximum}, got {value}")
    return value


def check_int_vector(x: Any, name: str, *, length: int | None = None) -> torch.Tensor:
    if isinstance(x, np.ndarray):
        if x.dtype.kind not in "iu":
            raise InputError(f"{name}: expected integer ids, got dtype {x.dtype}")
        x = torch.from_numpy(np.ascontiguousarray(x).astype(np.int64, copy=False))
    elif isinstance(x, torch.Tensor):
        if x.dtype.is_floating_point or x.dtype == torch.bool or x.is_complex():
            raise InputError(f"{name}: expected integer ids, got dtype {x.dtype}")
        x = x.long()
    else:
        raise InputError(f"{name}: expected a numpy array or torch tensor, got {type(x).__name__}")
    if x.dim() != 1:
        raise InputError(f"{name}: expected a 1-D array, got shape {tuple(x.shape)}")
    if length is not None and x.shape[0] != length:
        raise InputError(f"{name}: expected {length} entries (one per key), got {x.shape[0]}")
    if x.numel() and int(x.min()) < 0:
        raise InputError(f"{name}: ids must be >= 0, got {int(x.min())}")
    return x


def check_device(device: Any, name: str = "device") -> torch.device:
    """'cpu', 'cuda', 'cuda:N' (or a torch.device) -> torch.device, usable on this machine."""
    if isinstance(device, torch.device):
        dev = device
    else:
        try:
            dev = torch.device(str(device))
        except (RuntimeError, TypeError, ValueError):
            dev = None
        if dev is None or dev.type not in ("cpu", "cuda"):
            raise InputError(f"{name}: expected cpu, cuda or cuda:N, got {device!r}")
    if dev.type not in ("cpu", "cuda"):
        raise InputError(f"{name}: expected cpu, cuda or cuda:N, got {device!r}")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise InputError(f"{name}: {device!r} requested but no CUDA device is available; use cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise InputError(
                f"{name}: {device!r} requested but only {torch.cuda.device_count()} CUDA device(s) exist"
            )
    return dev


def check_threads(threads: Any, name: str = "threads") -> int | None:
    """None (torch's default) or a thread count >= 1, applied with torch.set_num_threads."""
    if threads is None:
        return None
    threads = check_positive_int(threads, name)
    torch.set_num_threads(threads)
    return threads
