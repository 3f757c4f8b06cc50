"""Prepare the ignored `.stage/` and `.whl/` folders for GPU runs through the device tool, and print the calls.

A device call carries the tracked tree plus what it names in `carry`, 64 MiB in all, so the SmolLM2 GGUF
(98 MB) travels in parts: this script splits it into as few parts as fit beside the tracked tree, packs the
benchmark datasets from ../shared/data into one small archive, and fetches the gguf wheel (the device has no
network). Each part is copied to /root/stage in its own call, back to back (a machine stays warm ~30 s),
and the last call joins them:

    python -m benchmarks.stage_for_gpu      # then make the printed calls, in order
"""

from __future__ import annotations

import hashlib
import math
import subprocess
import sys
import tarfile
from pathlib import Path

from blockspec.datasets import default_data_dir
from blockspec.hub import smollm2_gguf_path

ROOT = Path(__file__).resolve().parent.parent
CARRY_LIMIT = 64 * 2**20
MARGIN = 4 * 2**20  # untracked files, the wheel and the data archive ride along
DATASETS = ("gsm8k", "mbpp", "humaneval", "mt_bench")
GGUF_WHEEL = "gguf==0.19.0"


def tracked_bytes() -> int:
    names = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    return sum((ROOT / n).stat().st_size for n in names.decode().split("\0") if n and (ROOT / n).is_file())


def main() -> int:
    gguf = smollm2_gguf_path()
    stage, wheels = ROOT / ".stage", ROOT / ".whl"
    stage.mkdir(exist_ok=True)
    for old in stage.glob("part*"):
        old.unlink()
    room = CARRY_LIMIT - MARGIN - tracked_bytes()
    data = gguf.read_bytes()
    parts = math.ceil(len(data) / room)
    size = math.ceil(len(data) / parts)
    for i in range(parts):
        (stage / f"part{i:02d}").write_bytes(data[i * size:(i + 1) * size])
    with tarfile.open(stage / "data.tar.xz", "w:xz") as tar:
        for name in DATASETS:
            tar.add(default_data_dir() / name, arcname=f"data/{name}")
    if not list(wheels.glob("gguf-*.whl")):
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", str(wheels), GGUF_WHEEL],
                       check=True)
    digest = hashlib.sha256(data).hexdigest()
    print(f"{parts} parts of {size / 2**20:.1f} MiB beside {tracked_bytes() / 2**20:.1f} MiB tracked; "
          f"sha256 {digest[:16]}\n")
    for i in range(parts - 1):
        print(f"call {i + 1}: carry ['.stage/part{i:02d}']\n"
              f"  mkdir -p /root/stage && cp .stage/part{i:02d} /root/stage/")
    joined = " ".join(f"/root/stage/part{i:02d}" for i in range(parts - 1))
    print(f"call {parts}: carry ['.stage/part{parts - 1:02d}', '.whl', '.stage/data.tar.xz']\n"
          f"  cat {joined} .stage/part{parts - 1:02d} > /root/stage/{gguf.name} && "
          f"sha256sum /root/stage/{gguf.name} | cut -c1-16 && "
          f"pip install -q --no-index --no-deps --target /root/site .whl/*.whl && "
          f"mkdir -p /root/data && tar xJf .stage/data.tar.xz -C /root/data")
    print(f"\nthen: export PYTHONPATH=/root/site:$PWD BLOCKSPEC_DATA_DIR=/root/data/data "
          f"BLOCKSPEC_GIT_COMMIT=$(git rev-parse --short HEAD here); the target is /root/stage/{gguf.name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
