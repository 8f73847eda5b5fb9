"""Stage manifests: what a stage read (with content hashes), with which package versions and seed, on which machine
(CPU model, the SIMD level torch's kernels use, threads), how long it took (wall and CPU seconds) and the process's
peak resident memory. Runs of the same commit and seed reproduce to the digit on one machine; across machines the
kernels for another SIMD level round differently, and training amplifies that (docs/pipeline.md), so the machine
block says which numbers can be compared digit for digit.

`runs/<name>/<stage>/manifest.json` lets a later run decide whether a stage's inputs changed and lets a reader of a
results table trace every number back to exact inputs.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import platform
import resource
import sys
from collections.abc import Iterable
from importlib import metadata
from pathlib import Path

PACKAGES = ("rlrec", "torch", "transformers", "trl", "peft", "accelerate", "datasets", "tokenizers", "numpy")


def hash_path(path: str | Path) -> str:
    """SHA-256 of a file, or of a folder's files (relative names and bytes, in sorted order)."""
    path = Path(path)
    digest = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for file in files:
        if path.is_dir():
            digest.update(str(file.relative_to(path)).encode())
        with file.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def fingerprint(path: str | Path) -> str:
    """`sha256:<first 16 hex>` of a file's or folder's content (`hash_path`), computed once per process for each
    state of the files (their names, sizes and modification times): stage keys ask for it once per stage."""
    path = Path(path).resolve()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    state = tuple((str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files)
    return _fingerprint(path, state)


@functools.lru_cache(maxsize=256)
def _fingerprint(path: Path, state: tuple) -> str:
    return "sha256:" + hash_path(path)[:16]


def package_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


def machine() -> dict:
    """What decides the floating-point results of the same code on another machine. Torch's part only when the
    stage imported torch (a stage that did not use it does not pay for the import)."""
    model = next((line.split(":", 1)[1].strip() for line in _cpuinfo() if line.startswith("model name")), None)
    info = {"cpu": model or platform.processor() or platform.machine(), "cpu_count": os.cpu_count()}
    torch = sys.modules.get("torch")
    if torch is not None:
        info.update(torch_cpu_capability=torch.backends.cpu.get_cpu_capability(), torch_threads=torch.get_num_threads(),
                    cuda=torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)  # fmt: skip
    return info


def _cpuinfo() -> list[str]:
    try:
        return Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:  # not Linux
        return []


def write_manifest(stage_dir: Path, inputs: Iterable[str | Path], seed: int, wall_time_s: float, **extra) -> dict:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    manifest = {
        "inputs": {str(p): hash_path(p) for p in inputs if Path(p).exists()},
        "versions": package_versions(),
        "seed": seed,
        "machine": machine(),
        "wall_time_s": round(wall_time_s, 3),
        # peak resident memory of this process so far (Linux reports KiB); per process under accelerate launch
        "peak_rss_mb": round(usage.ru_maxrss / 1024, 1),
        # CPU seconds (user + system) of this process so far: comparable across runs that shared the cores
        "cpu_seconds": round(usage.ru_utime + usage.ru_stime, 1),
        "command": " ".join(sys.argv),
        **extra,
    }
    (stage_dir / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return manifest
