"""Run the tests that train networks, and the bitwise ones, under several CPU kernel settings.

    python tests/portable.py            # (make test-portable) every setting this CPU can run
    python tests/portable.py -- -x      # extra arguments go to pytest

A trained network's numbers depend on which SIMD kernels PyTorch and oneDNN pick: AVX-512,
AVX2 and SSE4.1 kernels round differently. A test tuned to one kernel's rounding passes on the
machine it was written on and fails on another. This runs the same tests with the kernels
forced down, on one machine:

- native: what this CPU picks (AVX-512 on a recent server, AVX2 on most laptops);
- `ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2`, where the CPU has more than AVX2;
- `ATEN_CPU_CAPABILITY=default ONEDNN_MAX_CPU_ISA=SSE41`: no vector extension beyond SSE4.1.

Each setting is checked in a child process (torch reports the capability it uses), so a
setting that the installed torch ignored cannot pass for one it did not run.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Every test that trains a network, and every bitwise claim about images and batches.
TESTS = ["test_crash_safety.py", "test_distributed.py", "test_wiring.py", "test_train.py",
         "test_precision.py", "test_schedule.py", "test_notebooks.py", "test_colab_notebook.py",
         "test_cache.py", "test_preprocessing.py"]

AVX2 = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}
SSE41 = {"ATEN_CPU_CAPABILITY": "default", "ONEDNN_MAX_CPU_ISA": "SSE41"}
EXPECTED = {"avx2": "AVX2", "default": "DEFAULT"}  # what torch reports for each setting


def capability(env: dict[str, str]) -> str:
    code = "import torch; print(torch.backends.cpu.get_cpu_capability())"
    return subprocess.run([sys.executable, "-c", code], env={**os.environ, **env},
                          capture_output=True, text=True, check=True).stdout.strip()


def settings(native: str) -> list[tuple[str, dict[str, str]]]:
    """(name, environment) for each kernel setting this CPU can run."""
    out = [("native", {})]
    if native.startswith("AVX512"):
        out.append(("AVX2", AVX2))
    if native != "DEFAULT":
        out.append(("SSE4.1", SSE41))
    return out


def main(pytest_args: list[str]) -> int:
    native = capability({})
    rows = []
    for name, env in settings(native):
        seen = capability(env)
        wanted = EXPECTED.get(env.get("ATEN_CPU_CAPABILITY", ""), native)
        if seen != wanted:
            print(f"{name}: torch runs {seen} kernels, not {wanted}: this torch ignores "
                  "ATEN_CPU_CAPABILITY, so the setting cannot be tested here.", file=sys.stderr)
            rows.append((name, seen, "not run", 0.0))
            continue
        label = " ".join(f"{k}={v}" for k, v in env.items()) or "(nothing set)"
        print(f"\n=== kernels: {name} ({seen}); {label}", flush=True)
        start = time.perf_counter()
        done = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider",
                               *[f"tests/{t}" for t in TESTS], *pytest_args],
                              env={**os.environ, **env}, cwd=ROOT)
        rows.append((name, seen, "passed" if done.returncode == 0 else "FAILED",
                     time.perf_counter() - start))
    print(f"\n{'setting':<8} {'torch kernels':<14} {'result':<8} {'minutes':>7}")
    for name, seen, result, seconds in rows:
        print(f"{name:<8} {seen:<14} {result:<8} {seconds / 60:>7.1f}")
    return 0 if all(r[2] == "passed" for r in rows) else 1


if __name__ == "__main__":
    args = sys.argv[1:]
    sys.exit(main(args[1:] if args[:1] == ["--"] else args))
