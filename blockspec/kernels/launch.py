"""How every Triton kernel of the package launches: programmatic dependent launch (Hopper and later) when
`KernelSettings.pdl` is on, each kernel waiting for the one before it in its first statement; and the shared memory
a program may take on the device, which a launch's tiles must fit."""

from __future__ import annotations

import functools
import sys

import torch
import triton
import triton.language as tl

from blockspec.kernels.settings import current_settings


@functools.lru_cache(maxsize=None)
def _supports_pdl(device_index: int) -> bool:
    return torch.cuda.get_device_capability(device_index)[0] >= 9


def use_pdl(t: torch.Tensor) -> bool:
    """Launch with programmatic dependent launch: enabled (`KernelSettings.pdl`) and a CUDA device that has it."""
    return current_settings().pdl and t.is_cuda and _supports_pdl(t.device.index if t.device.index is not None else 0)


def pdl_options(t: torch.Tensor) -> dict:
    """The launch options of a kernel here for tensors on t's device: the kernel's USE_PDL and Triton's."""
    on = use_pdl(t)
    return {"USE_PDL": on, "launch_pdl": on}


def prefetch_tiles(pdl: dict) -> int:
    """Tiles a kernel launched with `pdl` (pdl_options) asks L2 for before its PDL wait (KernelSettings.prefetch_tiles;
    none without PDL: nothing to overlap)."""
    return current_settings().prefetch_tiles if pdl["launch_pdl"] else 0


@functools.lru_cache(maxsize=None)
def _max_shared_bytes(device_index: int) -> int:
    return triton.runtime.driver.active.utils.get_device_properties(device_index)["max_shared_mem"]


def max_shared_bytes(t: torch.Tensor) -> int:
    """The most shared memory one program may take on t's device, the limit Triton checks a launch against; none
    off CUDA (Triton's interpreter)."""
    return _max_shared_bytes(t.device.index) if t.is_cuda else sys.maxsize


@triton.jit
def prefetch_l2(ptrs):
    """Ask L2 for the 128-byte lines at `ptrs` (a hint: nothing is read into registers, so it may run before the PDL
    wait on memory the kernel before is still writing; L2 is where that kernel's writes land)."""
    tl.inline_asm_elementwise("prefetch.global.L2 [$1]; mov.u32 $0, 0;", "=r,l", [ptrs.to(tl.int64)], dtype=tl.int32,
                              is_pure=False, pack=1)


@triton.jit
def pdl_prologue(USE_PDL: tl.constexpr):
    """Every kernel's first statement (after a skinny GEMM's or a decode attention's prefetch): the previous kernel's
    writes first, then the next may start launching."""
    if USE_PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
