"""Prepare the ignored `.stage/` and `.whl/` folders for the GPU runs that issues 25 and 26 still need, and print
the device calls that make them (each well inside a command's 10 minutes, every run under a `timeout` of its own
so that what finished comes back):

  1. issue 25's figures, first and on their own (no GGUF part: any lease will do; the tree as it is): the batched
     Qwen3.5-4B shape (c = 1..32, block 8, replay, floors and parts; its graph check runs seeded sampling under
     batch-invariant kernels), then engine_limit --qwen35 (contexts 512, 4096, 16384; flash-linear-attention
     carried for HF's peer). On a cold machine each takes about 4 minutes: Triton compiles every kernel first.
  2. issue 25's checks, on the same warm machine (its Triton cache): the hybrid and exactness CUDA tests
     (tests/test_hybrid.py, test_hybrid_kernels.py, test_exact.py, test_kernel_settings.py: 127 tests, 101 s warm
     at 4314118, over 200 s cold), engine_limit --qwen35 --timeline (where the steps' time goes), gdn_tiles, then
     tests/test_kernels.py for the time left (over 250 s cold; it passed whole at b088b74).
  3. issue 26: gemm_shapes --skinny at 256 rows (the 32 x 8 verify's products at 1.6x their floor on cuBLAS; 64-,
     128- and 256-row tiles), then batch_throughput on the Qwen3-4B shape under the sweep's winners (c = 1..64,
     AR, blocks 4/8/16 at the card's tau, floors, the parts of each step, sampled and log-probability steps; the
     prefill plain and drafted, beside the device's busy time and the host's functions). No wheels: the room goes
     to the GGUF. Set its c = 32 cells beside the last run's (or run c = 32 without the table in the same lease).
  4. SmolLM2: serve_load against a live `blockspec serve --exact` (64 streaming clients, every answer checked
     against the same request alone, the HTTP overhead at 32), then batch_throughput with the shipped DFlash, then
     vs_transformers (transformers' native DFlash generate beside blockspec, bf16, 6 gsm8k prompts).

All four take over 30 minutes, more than a session's budget: make the ones a change needs, old and new side by side.
A call carries the tracked tree plus what it names in `carry`, 64 MiB in all. The SmolLM2 GGUF (93.8 MiB) travels
in two parts, with calls 3 and 4, each copied to /root/stage; call 4 joins them and checks the digest. To make
room, calls 1 and 2 take the tree as it is, and after them the shipped drafts and benchmarks/results leave git's
index (ignored meanwhile: the commands are printed, the files stay here); call 4 takes the DFlash by name, and all
come back after it.
/root/stage lives only while the machine stays warm (about 30 s after a call): make calls 3 and 4 back to back,
nothing to do here between them. If call 4 finds a part missing, it stops at once and says so. A first start can
take minutes, and a refused one costs 15 s to 3 minutes of the 30: keep a margin.

What each call needs and the device lacks comes from here (it has no network): the datasets' files and the
server's, the openai client's and pytest's wheels for the device's Python 3.12 on x86_64, at the versions
installed here, except what its image already runs torch and transformers with (KINDS.md lists its packages).

    python -m benchmarks.stage_for_gpu      # then make the printed calls, in order
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
import tarfile
from dataclasses import dataclass, field
from importlib.metadata import requires, version
from pathlib import Path

from blockspec.datasets import default_data_dir
from blockspec.hub import smollm2_gguf_path

ROOT = Path(__file__).resolve().parent.parent
STAGE, WHEELS = ROOT / ".stage", ROOT / ".whl"
CARRY_LIMIT = 64 * 2**20
MARGIN = 2**20  # files that change between staging and the call (a commit, a log)
COMMAND_LIMIT = 2000  # characters of one device command
FLA_WHEELS = ("flash-linear-attention==0.6.0", "fla-core==0.6.0")
SERVE_ROOTS = ("fastapi", "uvicorn", "openai", "prometheus_client", "gguf")
TEST_ROOTS = ("pytest",)
DATA_FILES = ("gsm8k/test.jsonl",)  # the SmolLM2 batch_throughput prompts
DRAFTS = "blockspec/drafts"  # the shipped drafts: tracked, 16 MiB each
RESULTS = "benchmarks/results"  # tracked, read here only: it leaves the index with the drafts
SHIPPED = ("smollm2-135m-instruct-dflash", "smollm2-135m-instruct-dflare")
VERIFY_SHAPES = ("qkv", "o_proj", "gate_up", "down", "lm_head")  # the target's products in a batched verify
HYBRID_TESTS = "tests/test_hybrid.py tests/test_hybrid_kernels.py tests/test_exact.py tests/test_kernel_settings.py"
FLA_INSTALL = ("python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site "
               ".whl/fla/*.whl && ")
# in the device's image and what its torch and transformers run with: not shadowed by a carried copy
DEVICE_KEEPS = {"numpy", "pyyaml", "requests", "urllib3", "charset-normalizer", "certifi", "tqdm"}
DEVICE_PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64",
                    "manylinux2014_x86_64", "manylinux1_x86_64")
DEVICE_MARKERS = {"python_version": "3.12", "python_full_version": "3.12.3", "sys_platform": "linux",
                  "platform_system": "Linux", "platform_machine": "x86_64", "implementation_name": "cpython",
                  "platform_python_implementation": "CPython", "os_name": "posix", "extra": ""}


@dataclass
class Call:
    title: str
    minutes: str  # an estimate, before any of these runs was made on the device
    carry: list[str]  # paths relative to the repository root
    command: str
    returns: str
    parts: list[str] = field(default_factory=list)  # GGUF parts it carries to /root/stage
    drafts: tuple[str, ...] = ()  # the shipped drafts in git's index for it (SHIPPED's names)
    joins: bool = True  # carries a part of the GGUF (calls that do must be made back to back)


def tracked_bytes() -> int:
    """The tracked tree without the shipped drafts and the results (whether or not they are in the index now): what
    the GGUF calls carry of it."""
    names = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    return sum((ROOT / n).stat().st_size for n in names.decode().split("\0")
               if n and not n.startswith((DRAFTS + "/", RESULTS + "/")) and (ROOT / n).is_file())


def size(path: Path) -> int:
    return path.stat().st_size if path.is_file() else sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def head_commit() -> str:
    return subprocess.run(["git", "rev-parse", "--short=7", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                          check=True).stdout.strip()


def device_wheels(roots: tuple[str, ...]) -> dict[str, str]:
    """`roots` (e.g. the server's, the openai client's and gguf's packages) and everything they need on the device
    (Python 3.12, Linux), at the versions installed here, less DEVICE_KEEPS."""
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    wanted: dict[str, str] = {}
    todo = list(roots)
    while todo:
        name = canonicalize_name(todo.pop())
        if name in wanted or name in DEVICE_KEEPS:
            continue
        wanted[name] = version(name)
        for req in map(Requirement, requires(name) or []):
            if req.marker is None or req.marker.evaluate(DEVICE_MARKERS):
                todo.append(req.name)
    return dict(sorted(wanted.items()))


def download(folder: Path, specs: list[str]) -> None:
    """Wheels for the device's Python and platform (pip matches each manylinux tag exactly)."""
    folder.mkdir(parents=True, exist_ok=True)
    platforms = [arg for p in DEVICE_PLATFORMS for arg in ("--platform", p)]
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                    "--python-version", "3.12", "--implementation", "cp", *platforms, "-d", str(folder), *specs],
                   check=True)


def plan_parts(total: int, rooms: list[int]) -> list[int]:
    """Bytes of the GGUF each call carries, filling the last calls first (the fewer calls the parts depend on
    staying warm between, the better); 0 where a call carries none. ValueError if the rooms are too small."""
    sizes = [0] * len(rooms)
    left = total
    for i in reversed(range(len(rooms))):
        sizes[i] = max(0, min(left, rooms[i]))
        left -= sizes[i]
    if left > 0:
        raise ValueError(f"the GGUF needs {left / 2**20:.1f} MiB more room than the calls leave")
    return sizes


def install(folder: str) -> str:
    return (f"python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "
            f"{folder}/*.whl && export PYTHONPATH=/tmp/site:$PWD && ")


def calls(gguf_name: str, digest: str) -> list[Call]:
    """The device calls, in order (their parts added by `main`)."""
    run = "python3 -m benchmarks."
    gguf = f"/root/stage/{gguf_name}"
    tests = "python3 -m pytest -q -rf -p no:cacheprovider"
    return [
        Call("issue 25's figures: the batched Qwen3.5-4B shape, then engine_limit --qwen35", "9-10", [".whl/fla"],
             FLA_INSTALL + "export PYTHONPATH=/tmp/site:$PWD && "
             + f"timeout 270 {run}batch_throughput --workload qwen35_4b --repeats 1 --out $O 2>&1 "
             f"| tee $O/batch35.log; "
             f"timeout 290 {run}engine_limit --qwen35 --contexts 512 4096 16384 --steps 50 --peer-steps 5 --out $O "
             f"2>&1 | tee $O/engine_limit.log",
             "batch_throughput-*.json, engine_limit-*.json, two logs", drafts=SHIPPED, joins=False),
        Call("issue 25's checks: the hybrid CUDA tests, the Qwen3.5 timeline, gdn_tiles, then the kernel tests", "9-10",
             [".whl/test", ".whl/fla"],
             install(".whl/test") + FLA_INSTALL
             + f"timeout 330 {tests} {HYBRID_TESTS} 2>&1 | tail -15 | tee $O/pytest.log; "
             f"timeout 90 {run}engine_limit --qwen35 --timeline --out $O 2>&1 | tail -25 | tee $O/timeline.log; "
             f"timeout 40 {run}gdn_tiles --out $O 2>&1 | tail -14 | tee $O/gdn_tiles.log; "
             f"timeout 100 {tests} tests/test_kernels.py 2>&1 | tail -15 | tee $O/pytest_kernels.log",
             "pytest.log, pytest_kernels.log, engine_limit-*.json, gdn_tiles-*.json, two logs", drafts=SHIPPED,
             joins=False),
        Call("issue 26: the skinny sweep at 256 rows (a 32 x 8 verify's products), then the batched Qwen3-4B shape "
             "under its winners", "7-8", [],
             f"timeout 240 {run}gemm_shapes --skinny --quick --rows 256 --shapes {' '.join(VERIFY_SHAPES)} --out $O "
             f"2>&1 | tail -30 | tee $O/gemm.log; "
             f"timeout 230 {run}batch_throughput --workload qwen3_4b --repeats 1 --skinny-table $O/gemm_shapes-*.json "
             f"--out $O 2>&1 | tee $O/batch.log",
             "gemm_shapes-skinny-*.json, batch_throughput-*.json, two logs"),
        Call("issue 26: serve_load on a live server, SmolLM2 with the shipped DFlash, vs transformers", "5-6",
             [".whl/serve", ".stage/data.tar.xz", f"{DRAFTS}/{SHIPPED[0]}"],  # the DFlash, ignored meanwhile
             f"cat /root/stage/part* > {gguf} && echo '{digest}  {gguf}' | sha256sum -c - || "
             f"{{ echo 'the SmolLM2 GGUF is incomplete: the machine went back between calls'; ls -l /root/stage; "
             f"exit 3; }}; "
             + install(".whl/serve")
             + "mkdir -p /root/data && tar xJf .stage/data.tar.xz -C /root/data && "
             + f"timeout 200 {run}serve_load --device cuda --target {gguf} "
               f"--draft {DRAFTS}/{SHIPPED[0]} --requests 128 --concurrency 64 "
               f"--max-num-seqs 64 --max-tokens 256 --overhead-concurrency 32 --timeout 150 --exact --out $O "
               f"2>&1 | tee $O/serve.log; "
             + f"timeout 150 {run}batch_throughput --workload smollm2 --smollm2 {gguf} --drafts dflash "
               f"--data-dir /root/data/data --repeats 2 --out $O 2>&1 | tee $O/batch.log; "
             + f"timeout 70 {run}vs_transformers --device cuda --target {gguf} --dtype bfloat16 --max-samples 6 "
               f"--data-dir /root/data/data --out $O 2>&1 | tail -12 | tee $O/vs_transformers.log",
             "serve_load-*.json, batch_throughput-*.json, vs_transformers-*.json, three logs"),
    ]


def index_commands(before: tuple[str, ...], after: tuple[str, ...]) -> str:
    """Shell commands here that change which shipped drafts are in git's index (and so travel) from `before` to
    `after`, the results folder leaving with the first to leave and coming back with the last; those left out are
    ignored meanwhile, their files untouched."""
    leave = [f"{DRAFTS}/{name}" for name in SHIPPED if name in before and name not in after]
    back = [f"{DRAFTS}/{name}" for name in SHIPPED if name in after and name not in before]
    leave += [RESULTS] if before == SHIPPED and after != SHIPPED else []
    back += [RESULTS] if after == SHIPPED and before != SHIPPED else []
    return " && ".join([f"git rm -r -q --cached {path} && echo /{path}/ >> .git/info/exclude" for path in leave]
                       + [f"git reset -q -- {path} && sed -i '\\#^/{path}/$#d' .git/info/exclude" for path in back])


def device_command(call: Call, head: str) -> str:
    """The call's whole command: unbuffered output, $OUT as an absolute path ($O), this commit's hash for the
    records (no .git travels), its GGUF parts copied to /root/stage, then its runs."""
    copy = "".join(f"cp .stage/{p} /root/stage/ && " for p in call.parts)
    command = (f"export PYTHONUNBUFFERED=1 BLOCKSPEC_GIT_COMMIT={head}; set -o pipefail; "
               f"export O=$(cd \"$OUT\" && pwd); mkdir -p /root/stage && {copy}{call.command}")
    if len(command) > COMMAND_LIMIT:
        raise ValueError(f"{call.title}: the command has {len(command)} characters, more than {COMMAND_LIMIT}")
    return command


def main() -> int:
    gguf = smollm2_gguf_path()
    head = head_commit()
    STAGE.mkdir(exist_ok=True)
    for old in STAGE.glob("part*"):
        old.unlink()
    with tarfile.open(STAGE / "data.tar.xz", "w:xz") as tar:
        for name in DATA_FILES:
            tar.add(default_data_dir() / name, arcname=f"data/{name}")
    wheels = device_wheels(SERVE_ROOTS)
    for folder, specs in ((WHEELS / "fla", list(FLA_WHEELS)),
                          (WHEELS / "serve", [f"{name}=={v}" for name, v in wheels.items()]),
                          (WHEELS / "test", [f"{name}=={v}" for name, v in device_wheels(TEST_ROOTS).items()])):
        if len(list(folder.glob("*.whl"))) != len(specs):  # two versions of one package would stop the install
            for stale in folder.glob("*.whl"):
                stale.unlink()
            download(folder, specs)
    data = gguf.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    plan = calls(gguf.name, digest)
    base = tracked_bytes() + MARGIN
    rooms = [(CARRY_LIMIT - base - sum(size(ROOT / DRAFTS / d) for d in call.drafts)
              - sum(size(ROOT / p) for p in call.carry)) if call.joins else 0 for call in plan]
    offset = 0
    for i, (call, part) in enumerate(zip(plan, plan_parts(len(data), rooms))):
        if part:
            name = f"part{i:02d}"
            (STAGE / name).write_bytes(data[offset:offset + part])
            offset += part
            call.parts, call.carry = [name], call.carry + [f".stage/{name}"]
    print(f"tracked tree {(base - MARGIN) / 2**20:.1f} MiB; the GGUF ({len(data) / 2**20:.1f} MiB, sha256 "
          f"{digest[:16]}) in {sum(bool(c.parts) for c in plan)} parts; serve wheels "
          f"{size(WHEELS / 'serve') / 2**20:.1f} MiB ({', '.join(f'{n} {v}' for n, v in wheels.items())}); "
          f"flash-linear-attention {size(WHEELS / 'fla') / 2**20:.1f} MiB.\n")
    print("Make the calls that carry GGUF parts back to back (the machine goes back ~30 s after a call, and "
          "/root/stage with it), with kind left out (one H100; an H200 may come: say which card gave each number). "
          "Then render each JSON with `python -m benchmarks.X --report FILE` for docs/performance.md.\n")
    tracked = SHIPPED
    for i, call in enumerate(plan, 1):
        if call.drafts != tracked:
            print(f"  here, before call {i}: {index_commands(tracked, call.drafts)}\n")
            tracked = call.drafts
        carried = (base - MARGIN + sum(size(ROOT / DRAFTS / d) for d in call.drafts)
                   + (size(ROOT / RESULTS) if call.drafts == SHIPPED else 0) + sum(size(ROOT / p) for p in call.carry))
        print(f"call {i}: {call.title}; about {call.minutes} min (an estimate); carries {carried / 2**20:.1f} MiB\n"
              f"  carry: {call.carry}\n  command: {device_command(call, head)}\n  back under $OUT: {call.returns}\n")
    if tracked != SHIPPED:
        print(f"  here, after the last call: {index_commands(tracked, SHIPPED)}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
