"""predict.py beside a CPU-bound process, with idle OpenMP threads spinning (before) and sleeping
(after chexnet/idle_threads.py), side by side in one run.

    python benchmarks/idle_threads.py                 # 200 demo PNGs, 64 px, 1 busy process
    python benchmarks/idle_threads.py --images 200 --load 1 --repeats 3

Both commands predict the same images with the same checkpoint (a random-initialised
DenseNet-121 saved at 64 px: the weights do not change the work):
  before: the library's predict `main()` started without the policy, as predict.py ran before
      it imported chexnet.idle_threads (OMP_WAIT_POLICY unset: the OpenMP runtime's default,
      whose idle threads spin for a while before they sleep);
  after: `python predict.py` as a user runs it (the script sets OMP_WAIT_POLICY=PASSIVE).
The load is --load pure-Python busy loops, one core each, as a browser tab or another job
would be. The rows alternate (before, after, before, ...) so that a drift in the machine hits
both. Times are whole commands, start-up (importing torch, reading the checkpoint) included;
the start-up alone (predict.py on one image) is shown too. Figures: BENCHMARKS.md, "Idle
threads".
"""
from __future__ import annotations

import chexnet.idle_threads  # noqa: F401  (first, before torch loads: idle threads sleep)

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Sequence

ROOT = Path(__file__).resolve().parents[1]
BEFORE = "import sys; from chexnet.analysis.predict import main; sys.exit(main(sys.argv[1:]))"
BUSY = "while True: pass"


def make_inputs(folder: Path, n_images: int, size: int) -> tuple[Path, Path]:
    """(folder of n demo PNGs, a checkpoint at `size` px)."""
    import torch

    from chexnet.datatools.demo import make_nih_demo
    from chexnet.labels import NIH_FINDINGS
    from chexnet.model import build_model

    make_nih_demo(folder / "demo", n_images=n_images, size=size, seed=0)
    torch.manual_seed(0)
    ckpt = folder / "checkpoint.pt"
    torch.save({"model": build_model(len(NIH_FINDINGS), "none").state_dict(), "epoch": 1,
                "val_loss": 0.5, "config": {"image_size": size, "dataset": "nih"},
                "findings": list(NIH_FINDINGS)}, ckpt)
    return folder / "demo" / "images", ckpt


def timed(cmd: list[str], out: Path) -> float:
    """Seconds for one predict command; its own environment has no OMP_WAIT_POLICY."""
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    start = time.perf_counter()
    subprocess.run([*cmd, "--out", str(out)], env=env, cwd=ROOT, check=True,
                   stdout=subprocess.DEVNULL)
    seconds = time.perf_counter() - start
    out.unlink()
    return seconds


def measure(images: Path, ckpt: Path, work: Path, load: int, repeats: int
            ) -> dict[str, list[float]]:
    args = [str(images), "--checkpoint", str(ckpt), "--batch-size", "32"]
    commands = {"before": [sys.executable, "-c", BEFORE, *args],
                "after": [sys.executable, str(ROOT / "predict.py"), *args]}
    busy = [subprocess.Popen([sys.executable, "-c", BUSY]) for _ in range(load)]
    try:
        times: dict[str, list[float]] = {k: [] for k in commands}
        for _ in range(repeats):
            for name, cmd in commands.items():
                times[name].append(timed(cmd, work / f"{name}.csv"))
        return times
    finally:
        for p in busy:
            p.kill()
            p.wait()


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--images", type=int, default=200)
    p.add_argument("--image-size", dest="size", type=int, default=64)
    p.add_argument("--load", type=int, default=1, help="CPU-bound processes beside predict")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)
    import torch

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        images, ckpt = make_inputs(work, args.images, args.size)
        one = work / "one"
        one.mkdir()
        (one / "x.png").write_bytes(sorted(images.glob("*.png"))[0].read_bytes())
        startup = statistics.median(
            timed([sys.executable, str(ROOT / "predict.py"), str(one), "--checkpoint",
                   str(ckpt)], work / "s.csv") for _ in range(2))
        rows = {load: measure(images, ckpt, work, load, args.repeats)
                for load in sorted({0, args.load})}
    print(f"predict.py, {args.images} PNGs at {args.size} px, median of {args.repeats}; "
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch "
          f"{torch.__version__} ({torch.backends.cpu.get_cpu_capability()} kernels)")
    print(f"start-up alone (one image, after): {startup:.1f} s\n")
    print("| busy processes | idle threads | seconds | img/s (whole command) | after vs before |")
    print("|---|---|---|---|---|")
    for load, times in rows.items():
        before, after = statistics.median(times["before"]), statistics.median(times["after"])
        for name, sec in (("spin (before)", before), ("sleep (after)", after)):
            ratio = f"{before / after:.1f}x faster" if name.startswith("sleep") else ""
            print(f"| {load} | {name} | {sec:.1f} | {args.images / sec:.0f} | {ratio} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
