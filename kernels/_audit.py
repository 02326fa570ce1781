"""What a kernel file declares so the compile audit sees exactly what its launcher runs.

Every ``kernels/<op>.py`` that defines ``@triton.jit`` kernels also defines

    def audit_cases(device: DeviceSpec) -> list[AuditCase]

which walks the production shapes of that operation, asks the launcher's own pure
config function (``<op>_launch_config(..., device=DeviceSpec)``: block sizes, warps,
stages as a function of shapes and device properties, the same function the launcher
calls on CUDA) what it would run, and returns one :class:`AuditCase` per distinct
compiled configuration (deduplicated by ``config``). ``python -m amips.kernels.audit``
compiles every case for the requested architectures and reads registers, spills, shared
memory and tensor-core instructions from the cubin.

This module is pure data: no Triton import, no torch import beyond what a caller has.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class DeviceSpec:
    """The device properties a launch config may depend on."""

    capability: tuple[int, int]  # (9, 0) for H100/H200, (8, 0) for A100
    sm_count: int
    max_shared_bytes: int  # opt-in shared memory per block
    name: str = ""

    @property
    def arch(self) -> int:
        return self.capability[0] * 10 + self.capability[1]


# Presets the audit compiles for; ``device_spec`` reads a live CUDA device instead.
H100 = DeviceSpec((9, 0), 132, 232448, "H100/H200 (sm_90)")
A100 = DeviceSpec((8, 0), 108, 166912, "A100 (sm_80)")
PRESETS = {90: H100, 80: A100}


def device_spec(device=None) -> DeviceSpec:
    """The :class:`DeviceSpec` of a CUDA device (torch), for launchers at run time."""
    import torch

    props = torch.cuda.get_device_properties(device if device is not None else torch.cuda.current_device())
    smem = getattr(props, "shared_memory_per_block_optin", None) or PRESETS.get(
        props.major * 10 + props.minor, H100
    ).max_shared_bytes
    return DeviceSpec((props.major, props.minor), props.multi_processor_count, int(smem), props.name)


@dataclass(frozen=True)
class AuditCase:
    """One compiled configuration of one kernel, as its launcher would launch it.

    ``signature`` maps every kernel argument name to its Triton type string, in argument
    order: ``"*fp32"``, ``"*fp16"``, ``"*bf16"``, ``"*i64"``, ``"*i32"``, ``"*i8"``,
    ``"*u8"``, ``"i32"``, ``"i64"``, ``"fp32"``, or ``"constexpr"`` for constexpr
    arguments, whose values are in ``constexprs``. ``matrix`` says whether the kernel
    multiplies matrices (tensor-core instructions expected unless ``exact_fp32``, the
    ``ieee`` variants, which still must not spill). ``shapes`` says which production shapes
    chose this configuration (free text for the report).
    """

    kernel: Any
    signature: dict[str, str]
    constexprs: dict[str, Any]
    num_warps: int
    num_stages: int
    config: str
    matrix: bool
    exact_fp32: bool = False
    shapes: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def kernel_name(self) -> str:
        fn = getattr(self.kernel, "fn", self.kernel)
        return getattr(fn, "__name__", str(fn))


def dedupe(cases: list[AuditCase]) -> list[AuditCase]:
    """Keep the first case of each (kernel, config); merge their ``shapes`` notes."""
    seen: dict[tuple[str, str], AuditCase] = {}
    order: list[tuple[str, str]] = []
    notes: dict[tuple[str, str], list[str]] = {}
    for case in cases:
        key = (case.kernel_name, case.config)
        if key not in seen:
            seen[key] = case
            order.append(key)
            notes[key] = []
        if case.shapes and case.shapes not in notes[key]:
            notes[key].append(case.shapes)
    out = []
    for key in order:
        c = seen[key]
        shapes = "; ".join(notes[key][:6]) + (" ..." if len(notes[key]) > 6 else "")
        out.append(AuditCase(c.kernel, c.signature, c.constexprs, c.num_warps, c.num_stages,
                             c.config, c.matrix, c.exact_fp32, shapes, c.extra))
    return out
