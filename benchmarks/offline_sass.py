"""A Triton kernel compiled for sm_90 on a machine without a GPU, and what its binary holds: instructions (the
program's static count, which is its dynamic count where it has no runtime loop), barriers, layout conversions
through shared memory, registers and spills, and the kinds of memory instructions (their vector widths). When no
device is lent this tells whether an edit removes work before any GPU times it (kernels/gdn.py's inputs kernel: 1824
instructions and 65 barriers a program before its loads took one layout, 1336 and 25 after; the H100 then agreed).

Needs Triton (3.6 here), whose wheel carries ptxas, nvdisasm and cuobjdump. Integer arguments are compiled as
Triton would specialise them at a launch: divisible by 16 unless named in `unaligned`, equal to 1 where named in
`ones`; pointers 16-byte aligned.

    python -m benchmarks.offline_sass gdn_inputs     # the presets below: the kernels these numbers were read from
    python -m benchmarks.offline_sass gdn_inputs --module /tmp/edited_gdn.py   # the same kernel from an edited copy
"""

from __future__ import annotations

import argparse
import collections
import importlib.util
import re
import subprocess
import tempfile
from pathlib import Path
from typing import Callable

# (module, kernel, pointer dtypes, constexprs, arguments not divisible by 16, arguments equal to 1, launch options)
PRESETS: dict[str, tuple] = {
    # a Qwen3.5-4B layer's decode/verify inputs, its conv weight held taps-major (the engine's layout)
    "gdn_inputs": ("blockspec/kernels/gdn.py", "_gdn_inputs",
                   {"PROJ": "bf16", "CONV_W": "bf16", "A_LOG": "bf16", "DT_BIAS": "bf16", "POS": "i64",
                    "LENGTHS": "i64", "CONV": "bf16", "WINDOW": "bf16", "Q": "fp32", "K": "fp32", "V": "fp32",
                    "BETA": "fp32", "DECAY": "fp32"},
                   {"HK": 16, "HV": 32, "DK": 128, "DV": 128, "KERNEL": 4, "RAGGED": False, "PREFILL": False,
                    "USE_PDL": True},
                   ("s_cc", "s_pos", "n"), ("s_wc",), {"num_warps": 4, "enable_fp_fusion": False}),
}


def nvidia_tool(name: str) -> str:
    import triton

    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name)


def load_kernel(module: str, kernel: str) -> Callable:
    """`kernel` from the Python file `module` (a copy may be edited: Triton reads a kernel's source from its file)."""
    spec = importlib.util.spec_from_file_location(f"offline_{Path(module).stem}", module)
    loaded = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(loaded)
    return getattr(loaded, kernel)


def compile_sm90(fn: Callable, pointers: dict[str, str], constexprs: dict, unaligned: tuple[str, ...] = (),
                 ones: tuple[str, ...] = (), **options) -> dict:
    """Compile the JIT function `fn` for sm_90 (pointer arguments' element types in `pointers`, the other arguments
    32-bit integers) and read its binary: see the module docstring."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    names = fn.arg_names
    # an edited copy may lack some of the arguments named: those are skipped
    fixed = {n: v for n, v in {**constexprs, **{name: 1 for name in ones}}.items() if n in names}
    signature = {n: "constexpr" if n in fixed else f"*{pointers[n]}" if n in pointers else "i32" for n in names}
    aligned = [n for n in names if n not in fixed and n not in unaligned]
    source = ASTSource(fn, signature, constexprs={(names.index(n),): v for n, v in fixed.items()},
                       attrs={(names.index(n),): [["tt.divisibility", 16]] for n in aligned})
    compiled = triton.compile(source, target=GPUTarget("cuda", 90, 64), options=options)
    with tempfile.TemporaryDirectory() as folder:
        cubin = Path(folder) / "kernel.cubin"
        cubin.write_bytes(compiled.asm["cubin"])
        sass = subprocess.run([nvidia_tool("nvdisasm"), "-c", str(cubin)], capture_output=True, text=True,
                              check=True).stdout
        usage = subprocess.run([nvidia_tool("cuobjdump"), "-res-usage", str(cubin)], capture_output=True, text=True,
                               check=True).stdout
    opcodes = [m.group(1) for m in re.finditer(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][\w.]*)", sass)]
    counts = collections.Counter(opcodes)
    resources = {key.lower(): int(value) for key, value in re.findall(r"(REG|LOCAL|SHARED):(\d+)", usage)}
    return {"instructions": len(opcodes), "barriers": sum(v for k, v in counts.items() if k.startswith("BAR")),
            "layout_conversions": compiled.asm["ttgir"].count("ttg.convert_layout"),
            "registers": resources.get("reg"), "spilled_bytes": resources.get("local"),
            "shared_bytes": resources.get("shared"),
            "memory": {k: v for k, v in sorted(counts.items()) if re.match(r"(LDG|STG|LDS|STS|ATOM|RED)", k)},
            "top": counts.most_common(8)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("preset", choices=sorted(PRESETS))
    parser.add_argument("--module", help="the kernel's file (default: the preset's, in this checkout)")
    args = parser.parse_args()
    module, kernel, pointers, constexprs, unaligned, ones, options = PRESETS[args.preset]
    root = Path(__file__).resolve().parent.parent
    fn = load_kernel(args.module or str(root / module), kernel)
    for name, value in compile_sm90(fn, pointers, constexprs, unaligned, ones, **options).items():
        print(f"{name}: {value}")


if __name__ == "__main__":
    main()
