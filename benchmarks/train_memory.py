"""Peak memory of a DenseNet-121 training step, with and without --memory-efficient.

    python benchmarks/train_memory.py                      # 224 px, batches 8 and 16, CPU
    python benchmarks/train_memory.py --batches 16 32 --device cuda

Which settings fit a 6 GB card (a laptop RTX 3060)? Each config runs in a fresh process:
DenseNet-121 (14 outputs, random init) as retrain.py builds it (`model.build_model`, with
`memory_efficient` for --memory-efficient: torchvision's checkpointed dense layers), SGD with
momentum, --steps training steps of masked-free BCE on random uint8-range inputs. Reported:
  - CUDA: torch.cuda.max_memory_allocated (model, gradients, momentum, activations, the batch);
    the card also needs ~0.3-0.5 GB for the CUDA context and cuDNN workspaces.
  - CPU: the process's peak resident memory minus its resident memory just before the first
    step (the model, gradients and momentum already built): what training adds, mostly the
    activations kept for backward. A proxy for the GPU figure, not the same number: the GPU
    allocator rounds and caches blocks, and cuDNN picks other algorithms. The reference
    config (fp32, batch 16, no checkpointing) sits beside the others in the same run.
"""
from __future__ import annotations

import chexnet.idle_threads  # noqa: F401  (first, before torch loads: idle threads sleep)

import argparse
import json
import resource
import subprocess
import sys
import time
from typing import Sequence


def _rss_mib() -> float:
    with open("/proc/self/statm") as fh:
        pages = int(fh.read().split()[1])
    return pages * resource.getpagesize() / 2**20


def _child(batch: int, size: int, memory_efficient: bool, device: str, steps: int) -> dict:
    import torch

    from chexnet.model import build_model

    torch.manual_seed(0)
    dev = torch.device(device)
    net = build_model(14, "none", memory_efficient).to(dev).train()
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    x = torch.rand(batch, 3, size, size, device=dev)
    y = (torch.rand(batch, 14, device=dev) > 0.9).float()
    loss_fn = torch.nn.BCEWithLogitsLoss()
    for p in net.parameters():  # gradients and momentum exist before the measured steps
        p.grad = torch.zeros_like(p)
    opt.step()
    opt.zero_grad(set_to_none=False)
    before = _rss_mib()
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(dev)
        base = torch.cuda.memory_allocated(dev)
    t0 = time.perf_counter()
    for _ in range(steps):
        opt.zero_grad(set_to_none=False)
        loss = loss_fn(net(x), y)
        loss.backward()
        opt.step()
    float(loss)  # synchronises
    seconds = (time.perf_counter() - t0) / steps
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    out = {"batch": batch, "memory_efficient": memory_efficient, "device": device,
           "s_per_step": seconds, "cpu_added_mib": peak_rss - before}
    if dev.type == "cuda":
        out["cuda_peak_gb"] = torch.cuda.max_memory_allocated(dev) / 1e9
        out["cuda_state_gb"] = base / 1e9
        out["gpu"] = torch.cuda.get_device_name(dev)
    out["torch"] = torch.__version__
    return out


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batches", type=int, nargs="+", default=[8, 16])
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--device", default="cpu")
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        batch, efficient = args.child.split(",")
        print(json.dumps(_child(int(batch), args.image_size, efficient == "1", args.device,
                                args.steps)))
        return 0
    rows = []
    for batch in args.batches:
        for efficient in (False, True):
            done = subprocess.run(
                [sys.executable, __file__, "--child", f"{batch},{int(efficient)}",
                 "--image-size", str(args.image_size), "--device", args.device,
                 "--steps", str(args.steps)], capture_output=True, text=True)
            if done.returncode != 0:
                print(done.stderr[-2000:], file=sys.stderr)
                return done.returncode
            rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    gpu = args.device != "cpu"
    print(f"DenseNet-121 training step, {args.image_size} px, fp32, SGD momentum, "
          f"{args.steps} steps per config, device {args.device}"
          + (f" ({rows[0]['gpu']})" if gpu else "") + f", torch {rows[0]['torch']}")
    head = "| batch | --memory-efficient | " + (
        "CUDA peak GB | " if gpu else "") + "memory added by training (CPU RSS, MiB) | s/step |"
    print(head)
    print("|" + " ---: |" * (head.count("|") - 1))
    for r in rows:
        cuda = f" {r['cuda_peak_gb']:.2f} |" if gpu else ""
        print(f"| {r['batch']} | {'yes' if r['memory_efficient'] else 'no'} |{cuda} "
              f"{r['cpu_added_mib']:,.0f} | {r['s_per_step']:.2f} |")
    ref = next((r for r in rows if r["batch"] == 16 and not r["memory_efficient"]), None)
    eff = next((r for r in rows if r["batch"] == 16 and r["memory_efficient"]), None)
    if ref and eff:
        key = "cuda_peak_gb" if gpu else "cpu_added_mib"
        print(f"batch 16: --memory-efficient needs {eff[key] / ref[key]:.2f}x the memory of "
              f"the reference config and takes {eff['s_per_step'] / ref['s_per_step']:.2f}x "
              "the time per step")
    return 0


if __name__ == "__main__":
    sys.exit(main())
