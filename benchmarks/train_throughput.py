"""GPU training throughput: the reference recipe against AMP, channels_last, large batch, compile.

    python benchmarks/train_throughput.py --json out.json              # CUDA: a few minutes
    python benchmarks/train_throughput.py --json out.json --check-amp  # + AMP accuracy check
    python benchmarks/train_throughput.py --quick                      # smoke run (tests, CPU)

In one run, on one device, DenseNet-121 (14 outputs, random init) at --image-size (224):
  (a) reference: fp32, NCHW, batch 16, no compile (the CheXNet / reproduce-chexnet recipe; on
      Ampere+ GPUs PyTorch's default lets cuDNN use TF32 for "fp32" convolutions, as the
      reference code also got; the flags are printed);
  (b) AMP (`--amp auto`: bf16 on Ampere/Hopper, fp16 + GradScaler on older cards) +
      channels_last, batch 16;
  (c) best: --best-batch (256), AMP, channels_last, torch.compile (default mode; falls back to
      eager with a message when compiling fails).
Training is `train.train_one_epoch` itself (flip_batch, autocast, masked BCE, SGD step,
GradScaler, its per-step loss read-back and tqdm bar) over N synthetic batches already on the
device (random uint8 grey images, random 0/1 targets); evaluation is `train.evaluate`
(inference_mode). Each config: warm-up first (it holds compile time; reported apart), then the
median of --repeats timed passes of --steps batches, torch.cuda.synchronize before every clock
read; peak memory is torch.cuda.max_memory_allocated since the config started (model, optimizer
state, activations and the synthetic input batches).

Then one end-to-end training epoch with config (c) from a real uint8 cache (written straight in
chexnet/cache.py's format and validated by `open_cache`) through `loaders.make_loaders`, exactly
what retrain.py uses: `cache.CachedImages` in torch's DataLoader (pinned, one worker on a GPU),
normalised on the device. Its
img/s gives the extrapolated NIH training-pass time (78,468 images).

--check-amp: the issue's acceptance check "bf16/fp16 training on GPU gives validation loss within
1% of fp32 after the same steps on the demo data": the same seeded model is trained for the same
steps on a generated demo set (demo_data.make_nih_demo) in fp32 and in AMP, through
retrain's make_loaders / train_one_epoch / evaluate, and both validation losses are compared.

--quick (automatic without CUDA): image size 64, batches 4/8, 2 repeats of 2 steps, compile off
on CPU unless `--compile on`, a 32-image cache epoch, and a 2-step bf16-on-CPU AMP check: a
smoke test of the code paths, not a performance figure.

The last two lines are `best/reference train speedup: N.Nx` and
`NIH epoch estimate (78,468 images): N s`.
"""
from __future__ import annotations

import chexnet.idle_threads  # noqa: F401  (first, before torch loads: idle threads sleep)

import argparse
import dataclasses
import gc
import itertools
import json
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import pandas as pd
import torch
from torch import nn

from chexnet.files import sha256_file
from chexnet.cache import (
    CACHE_VERSION, DONE, DONE_FILE, IMAGES_FILE, INDEX_FILE, MANIFEST_FILE, CachedImages,
    cache_dir,
)
from chexnet.data import DEFAULT_NIH_LABELS, LabelTable
from chexnet.labels import findings_for
from chexnet.model import build_model
from chexnet.config import TrainConfig
from chexnet.loaders import EpochSampler, load_tables, make_loaders
from chexnet.runs import EpochProgress, seed_everything
from chexnet.runtime import Precision
from chexnet.train import NonFiniteLoss, evaluate, train_one_epoch
from chexnet.runtime import (
    AMP_CHOICES, REFERENCE_BATCH, grad_scaler, maybe_compile, probe_batch_size, resolve_amp,
    scaled_lr,
)

# The project is installed (make / pip install -e .); ROOT is only for default paths.
ROOT = Path(__file__).resolve().parents[1]

NIH_TRAIN_IMAGES = 78_468   # the NIH training pass the issue asks to extrapolate to
AMP_TOLERANCE = 0.01        # acceptance: |val loss (AMP) - val loss (fp32)| / val loss (fp32)
FINDINGS = list(findings_for("nih"))
INPUT_SETS = 2              # distinct synthetic batches cycled through, so no pass reuses one


# --------------------------------------------------------------------------------------------
# Settings
# --------------------------------------------------------------------------------------------
@dataclass
class Sizes:
    """How much work each measurement does (CUDA defaults fit 6 minutes on an H100)."""
    image_size: int = 224
    ref_batch: int = REFERENCE_BATCH
    best_batch: int = 256
    eval_batch: int = 64            # (a), (b): retrain's --eval-batch-size; (c) uses best_batch
    steps: int = 20                 # training batches per timed pass
    eval_steps: int = 10            # evaluation batches per timed pass
    repeats: int = 5
    warmup: int = 3                 # untimed batches first (compile happens here)
    cache_train: int = 4096         # end-to-end epoch: 16 full batches of 256
    cache_val: int = 1024
    cache_test: int = 256
    amp_images: int = 600           # --check-amp demo set
    amp_image_px: int = 128
    amp_batch: int = 32
    amp_steps: int = 48

    @classmethod
    def quick(cls) -> "Sizes":
        """Seconds on a CPU: exercises every code path, measures nothing."""
        return cls(image_size=64, ref_batch=4, best_batch=8, eval_batch=8, steps=2,
                   eval_steps=2, repeats=2, warmup=1, cache_train=32, cache_val=8, cache_test=8,
                   amp_images=48, amp_image_px=32, amp_batch=8, amp_steps=2)


@dataclass
class BenchConfig:
    """One row of the table."""
    key: str
    label: str
    batch: int
    eval_batch: int
    amp: torch.dtype | None
    channels_last: bool
    compile: bool


@dataclass
class ConfigResult:
    """What one config measured. Rates are images per second; times are seconds."""
    key: str
    label: str
    batch: int
    eval_batch: int
    amp: str
    channels_last: bool
    compile_requested: bool
    compiled: bool
    steps: int
    eval_steps: int
    train_img_s: float
    eval_img_s: float
    train_times_s: list[float]
    eval_times_s: list[float]
    train_warmup_s: float
    eval_warmup_s: float
    compile_train_s: float | None   # warm-up time beyond what the same steps take when warm
    compile_eval_s: float | None
    peak_gb: float | None
    train_speedup: float = 1.0
    eval_speedup: float = 1.0
    notes: list[str] = field(default_factory=list)


def dtype_name(dtype: torch.dtype | None) -> str:
    return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, str(dtype))


# --------------------------------------------------------------------------------------------
# Timing helpers
# --------------------------------------------------------------------------------------------
def sync(device: torch.device) -> None:
    """Wait for queued GPU work: a host clock read before it would time only the launches."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device) -> float:
    """Wall seconds of `fn()`, synchronised on both sides."""
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


class SyntheticBatches:
    """A loader stand-in for train_one_epoch / evaluate: `steps` batches of (images, targets,
    ids) that already live on the device, cycling through a few distinct input sets.

    Random uint8 grey images (what the project's loaders yield; the training loop normalises
    them on the device) and random 0/1 targets: all-zero inputs can run faster than real data
    and would hide nothing-computed bugs.
    """

    def __init__(self, batch: int, image_size: int, steps: int, device: torch.device,
                 seed: int = 0):
        g = torch.Generator(device=device).manual_seed(seed)
        self.images = [torch.randint(0, 256, (batch, 1, image_size, image_size), generator=g,
                                     device=device, dtype=torch.uint8)
                       for _ in range(INPUT_SETS)]
        self.targets = [torch.randint(0, 2, (batch, len(FINDINGS)), generator=g, device=device
                                      ).float() for _ in range(INPUT_SETS)]
        self.ids = [f"synthetic_{i}" for i in range(batch)]
        self.steps = steps
        # evaluate() reads len(loader.dataset.findings)
        self.dataset = type("SyntheticDataset", (), {"findings": tuple(FINDINGS)})()

    def take(self, steps: int) -> "SyntheticBatches":
        """The same inputs, `steps` batches per pass."""
        other = object.__new__(SyntheticBatches)
        other.__dict__.update(self.__dict__, steps=steps)
        return other

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, list[str]]]:
        for i in range(self.steps):
            k = i % INPUT_SETS
            yield self.images[k], self.targets[k], self.ids


class FirstBatches:
    """The first `steps` batches of a loader (a fixed step count for --check-amp)."""

    def __init__(self, loader: object, steps: int):
        self.loader, self.steps = loader, steps
        self.dataset = loader.dataset

    def __len__(self) -> int:
        return min(self.steps, len(self.loader))

    def __iter__(self) -> Iterator:
        return itertools.islice(iter(self.loader), len(self))


# --------------------------------------------------------------------------------------------
# One configuration
# --------------------------------------------------------------------------------------------
@dataclass
class Trainer:
    """Model, optimizer and precision of one config, set up as train.fit sets them up."""
    net: nn.Module                  # the eager module (what compile wraps)
    model: nn.Module                # what is called: compiled or `net`
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    precision: Precision
    compiled: bool
    seed: int = 0
    epoch: int = 0
    fallback: str | None = None     # why a compiled model was replaced by the eager one

    def train(self, loader: object, device: torch.device, desc: str = "bench train") -> float:
        """One train.train_one_epoch pass over `loader`; returns its mean loss."""
        self.epoch += 1
        return train_one_epoch(self.model, loader, self.optimizer, device,
                               EpochProgress(self.epoch), self.seed, None, desc,
                               self.precision, self.scaler)

    def evaluate(self, loader: object, device: torch.device, desc: str = "bench eval") -> float:
        return evaluate(self.model, loader, device, desc, self.precision)[0]


def make_trainer(bc: BenchConfig, device: torch.device, say: Callable[[str], None],
                 seed: int = 0) -> Trainer:
    defaults = TrainConfig()
    torch.manual_seed(seed)
    net = build_model(len(FINDINGS), "none").to(device)
    if bc.channels_last:
        net = net.to(memory_format=torch.channels_last)
    # The reference lr at every batch: lr does not change what a step costs, and it keeps SGD on
    # random targets finite (retrain's linear scaling to lr 0.16 at batch 256 is not needed here).
    optimizer = torch.optim.SGD(net.parameters(), lr=defaults.lr, momentum=defaults.momentum,
                                weight_decay=defaults.weight_decay)
    model = maybe_compile(net, bc.compile, say)
    return Trainer(net, model, optimizer, grad_scaler(device, bc.amp),
                   Precision(bc.amp, bc.channels_last), model is not net, seed)


def first_pass(trainer: Trainer, run: Callable[[], object], device: torch.device,
               say: Callable[[str], None]) -> float:
    """Time the warm-up pass `run()`; if the compiled model fails there (torch.compile only
    compiles on the first call), fall back to the eager model with a message and warm that."""
    try:
        return timed(run, device)
    except (RuntimeError, ImportError, NotImplementedError) as err:
        # Out of memory and a NaN loss are not compile failures; an eager failure is a real bug.
        if not trainer.compiled or isinstance(err, (torch.cuda.OutOfMemoryError, NonFiniteLoss)):
            raise
        first = (str(err).strip().splitlines() or [""])[0][:200]
        trainer.fallback = f"torch.compile failed at the first step ({type(err).__name__}: {first})"
        say(f"{trainer.fallback}; this config runs uncompiled from here on")
        trainer.model, trainer.compiled = trainer.net, False
        return timed(run, device)


def run_config(bc: BenchConfig, sizes: Sizes, device: torch.device,
               say: Callable[[str], None]) -> tuple[ConfigResult, Trainer]:
    """Warm up, then time training and evaluation passes of one config."""
    if device.type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    trainer = make_trainer(bc, device, say)
    train_data = SyntheticBatches(bc.batch, sizes.image_size, sizes.steps, device, seed=1)
    eval_data = SyntheticBatches(bc.eval_batch, sizes.image_size, sizes.eval_steps, device,
                                 seed=2)

    warm = train_data.take(sizes.warmup)
    train_warm = first_pass(trainer, lambda: trainer.train(warm, device), device, say)
    train_times = [timed(lambda: trainer.train(train_data, device), device)
                   for _ in range(sizes.repeats)]
    warm_eval = eval_data.take(max(1, sizes.warmup - 1))
    eval_warm = first_pass(trainer, lambda: trainer.evaluate(warm_eval, device), device, say)
    eval_times = [timed(lambda: trainer.evaluate(eval_data, device), device)
                  for _ in range(sizes.repeats)]

    train_med, eval_med = statistics.median(train_times), statistics.median(eval_times)
    compile_train = compile_eval = None
    if trainer.compiled:
        compile_train = max(0.0, train_warm - train_med * len(warm) / sizes.steps)
        compile_eval = max(0.0, eval_warm - eval_med * len(warm_eval) / sizes.eval_steps)
    peak = (torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else None)
    result = ConfigResult(
        bc.key, bc.label, bc.batch, bc.eval_batch, dtype_name(bc.amp), bc.channels_last,
        bc.compile, trainer.compiled, sizes.steps, sizes.eval_steps,
        bc.batch * sizes.steps / train_med, bc.eval_batch * sizes.eval_steps / eval_med,
        train_times, eval_times, train_warm, eval_warm, compile_train, compile_eval, peak)
    if bc.compile and not trainer.compiled:
        result.notes.append(trainer.fallback or "torch.compile unavailable: ran uncompiled")
    say(f"{bc.key}: train {result.train_img_s:.1f} img/s, eval {result.eval_img_s:.1f} img/s"
        + (f", peak {peak:.2f} GB" if peak is not None else "")
        + f", warm-up {train_warm:.1f} s / {eval_warm:.1f} s"
        + (f" (compile ~{compile_train:.0f} s / ~{compile_eval:.0f} s)"
           if compile_train is not None else ""))
    return result, trainer


def release() -> None:
    """Return freed GPU memory once the caller has dropped a config's model, so the next
    config's peak memory starts from (almost) nothing."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def run_best(bc: BenchConfig, sizes: Sizes, device: torch.device,
             say: Callable[[str], None]) -> tuple[ConfigResult, Trainer]:
    """Config (c); on out-of-memory, halve the batch and retry (down to the reference batch)."""
    while True:
        try:
            return run_config(bc, sizes, device, say)
        except torch.cuda.OutOfMemoryError:
            if bc.batch // 2 < REFERENCE_BATCH:
                raise
        # Outside the except block: the traceback (and the tensors its frames hold) is gone.
        release()
        say(f"(c): batch {bc.batch} does not fit in GPU memory; trying {bc.batch // 2} "
            "(pass a smaller --best-batch to skip this)")
        bc.batch //= 2
        bc.eval_batch = bc.batch


# --------------------------------------------------------------------------------------------
# End to end: one epoch from the uint8 cache
# --------------------------------------------------------------------------------------------
def write_cache(root: Path, size: int, table: pd.DataFrame, labels_path: Path,
                seed: int = 0) -> Path:
    """A complete cache of random uint8 images under root/cache/<size>, in chexnet/cache.py's
    on-disk format (see its module docstring); open_cache validates it like any other.

    Writing the memory map directly skips generating and decoding thousands of PNGs, which the
    epoch being measured never sees anyway.
    """
    folder = cache_dir(root, size)
    folder.mkdir(parents=True, exist_ok=True)
    n = len(table)
    images = np.memmap(folder / IMAGES_FILE, dtype=np.uint8, mode="w+", shape=(n, size, size))
    rng = np.random.default_rng(seed)
    step = max(1, (64 << 20) // (size * size))  # 64 MB of pixels at a time
    for i in range(0, n, step):
        images[i:i + step] = rng.integers(0, 256, (min(step, n - i), size, size), np.uint8)
    images.flush()
    del images
    pd.DataFrame({"row": np.arange(n), "image_id": table["image_id"]}).to_csv(
        folder / INDEX_FILE, index=False)
    np.save(folder / DONE_FILE, np.full(n, DONE, np.uint8))
    now = datetime.now(timezone.utc).isoformat(timespec="seconds")
    manifest = {"version": CACHE_VERSION, "size": size, "count": n,
                "labels_sha256": sha256_file(labels_path), "created": now, "completed": now,
                "complete": True, "skipped_count": 0, "skipped": [], "dataset": "nih",
                "source_root": "benchmarks/train_throughput.py (random pixels)"}
    (folder / MANIFEST_FILE).write_text(json.dumps(manifest, indent=1) + "\n")
    return folder


def cache_table(sizes: Sizes, seed: int = 0) -> pd.DataFrame:
    """An NIH-shaped label table (image_id, fold, 14 findings as random 0/1)."""
    folds = (["train"] * sizes.cache_train + ["val"] * sizes.cache_val
             + ["test"] * sizes.cache_test)
    rng = np.random.default_rng(seed)
    table = pd.DataFrame({"image_id": [f"{i:08d}_000.png" for i in range(len(folds))],
                          "fold": folds})
    labels = rng.integers(0, 2, (len(folds), len(FINDINGS))).astype(np.float32)
    return pd.concat([table, pd.DataFrame(labels, columns=FINDINGS)], axis=1)


def cache_epoch(trainer: Trainer, batch: int, sizes: Sizes, device: torch.device, workdir: Path,
                say: Callable[[str], None]) -> dict:
    """One training epoch and one validation pass of `trainer` from a uint8 cache, through
    retrain's own loader factory (make_loaders, as fit calls it)."""
    root = workdir / "cache_root"
    root.mkdir(parents=True, exist_ok=True)
    table = cache_table(sizes)
    labels_path = root / "nih_labels.csv"
    table.to_csv(labels_path, index=False)
    t0 = time.perf_counter()
    write_cache(root, sizes.image_size, table, labels_path)
    write_s = time.perf_counter() - t0
    cfg = TrainConfig(dataset="nih", data=str(root), labels=str(labels_path),
                      image_size=sizes.image_size, batch_size=batch, eval_batch_size=batch,
                      seed=0)
    loaders = make_loaders(cfg, LabelTable(table, tuple(FINDINGS), "file", (str(labels_path),)),
                           device)
    if not isinstance(loaders["train"].dataset, CachedImages):
        raise RuntimeError(f"open_cache rejected the benchmark's cache under {root}: "
                           "chexnet/cache.py's format changed; update write_cache")
    if sizes.cache_train % batch:
        say(f"note: {sizes.cache_train} training images is not a multiple of batch {batch}: "
            "the last, partial batch is in the timing (with compile: a recompile for its shape)")
    loaders["train"].sampler.set_epoch(1)
    train_s = timed(lambda: trainer.train(loaders["train"], device, "cache epoch"), device)
    val_s = timed(lambda: trainer.evaluate(loaders["val"], device, "cache val"), device)
    train_rate = sizes.cache_train / train_s
    val_rate = sizes.cache_val / val_s
    nih_val = nih_fold_count("val")
    out = {"images": sizes.cache_train, "val_images": sizes.cache_val, "batch": batch,
           "image_size": sizes.image_size, "cache_write_s": write_s, "train_s": train_s,
           "train_img_s": train_rate, "val_s": val_s, "val_img_s": val_rate,
           "nih_train_images": NIH_TRAIN_IMAGES,
           "nih_epoch_estimate_s": NIH_TRAIN_IMAGES / train_rate,
           "nih_val_images": nih_val,
           "nih_val_estimate_s": nih_val / val_rate if nih_val else None}
    say(f"cache epoch: {sizes.cache_train} images in {train_s:.2f} s ({train_rate:.1f} img/s), "
        f"val {sizes.cache_val} images in {val_s:.2f} s ({val_rate:.1f} img/s)")
    return out


def nih_fold_count(fold: str) -> int | None:
    """Images in `fold` of the committed NIH split (for the validation-pass estimate)."""
    if not Path(DEFAULT_NIH_LABELS).is_file():
        return None
    folds = pd.read_csv(DEFAULT_NIH_LABELS, usecols=["fold"])["fold"]
    return int((folds == fold).sum())


# --------------------------------------------------------------------------------------------
# --check-amp: validation loss of AMP training against fp32
# --------------------------------------------------------------------------------------------
def check_amp(sizes: Sizes, device: torch.device, amp_choice: str, workdir: Path,
              say: Callable[[str], None]) -> dict:
    """Train the same seeded model for the same steps in fp32 and in AMP on a generated demo
    set, with retrain's loaders, training step and evaluation; compare validation losses."""
    from chexnet.datatools.demo import make_nih_demo

    # On a CPU, `auto` means fp32 (resolve_amp): bf16 autocast is forced to exercise the path.
    amp = resolve_amp("bf16" if device.type == "cpu" else amp_choice, device)
    if amp is None:
        raise ValueError(f"--check-amp needs mixed precision; --amp {amp_choice} is fp32")
    root = workdir / "demo_nih"
    t0 = time.perf_counter()
    make_nih_demo(root, n_images=sizes.amp_images, size=sizes.amp_image_px, seed=0,
                  workers=1 if device.type == "cpu" else 8)
    say(f"amp check: demo set of {sizes.amp_images} images at {sizes.amp_image_px} px in "
        f"{time.perf_counter() - t0:.1f} s")
    losses: dict[str, float] = {}
    steps_done = 0
    for name, dtype in (("fp32", None), (dtype_name(amp), amp)):
        cfg = TrainConfig(dataset="demo", data=str(root), image_size=sizes.amp_image_px,
                          batch_size=sizes.amp_batch, eval_batch_size=64, weights="none",
                          workers=0 if device.type == "cpu" else -1, seed=0)
        labels, _ = load_tables(cfg)
        table, findings = labels.frame, list(labels.findings)
        loaders = make_loaders(cfg, labels, device)
        seed_everything(cfg.seed)  # the same initial weights for both runs
        net = build_model(len(findings), "none").to(device)
        optimizer = torch.optim.SGD(net.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                                    weight_decay=cfg.weight_decay)
        precision, scaler = Precision(dtype), grad_scaler(device, dtype)
        sampler: EpochSampler = loaders["train"].sampler
        steps_done, epoch = 0, 0
        while steps_done < sizes.amp_steps:
            epoch += 1
            sampler.set_epoch(epoch)
            part = FirstBatches(loaders["train"], sizes.amp_steps - steps_done)
            train_one_epoch(net, part, optimizer, device, EpochProgress(epoch), cfg.seed,
                            None, f"amp check {name}", precision, scaler)
            steps_done += len(part)
        losses[name], *_ = evaluate(net, loaders["val"], device, f"amp check {name} val",
                                    precision)
        del net, optimizer, loaders
        release()
    ref, mixed = losses["fp32"], losses[dtype_name(amp)]
    rel = abs(mixed - ref) / ref
    out = {"amp": dtype_name(amp), "device": device.type, "images": sizes.amp_images,
           "image_size": sizes.amp_image_px, "batch": sizes.amp_batch, "steps": steps_done,
           "val_images": int((table["fold"] == "val").sum()), "fp32_val_loss": ref,
           "amp_val_loss": mixed, "rel_diff": rel, "tolerance": AMP_TOLERANCE,
           "passed": rel < AMP_TOLERANCE}
    return out


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------
def fmt(value: float | None, spec: str = ".1f") -> str:
    return "n/a" if value is None else format(value, spec)


def markdown_table(results: Sequence[ConfigResult]) -> str:
    rows = ["| config | batch | eval batch | train img/s | eval img/s | peak GB | "
            "train speedup vs (a) | eval speedup vs (a) | warm-up s (train / eval) |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in results:
        rows.append(f"| ({r.key}) {r.label} | {r.batch} | {r.eval_batch} | {r.train_img_s:.1f} "
                    f"| {r.eval_img_s:.1f} | {fmt(r.peak_gb, '.2f')} | {r.train_speedup:.2f}x "
                    f"| {r.eval_speedup:.2f}x | {r.train_warmup_s:.1f} / {r.eval_warmup_s:.1f} |")
    return "\n".join(rows)


def environment(device: torch.device) -> dict:
    env = {"device": (torch.cuda.get_device_name(device) if device.type == "cuda"
                      else f"CPU (torch threads: {torch.get_num_threads()})"),
           "device_type": device.type, "torch": torch.__version__, "cuda": torch.version.cuda,
           "date": datetime.now(timezone.utc).date().isoformat(),
           "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
           "matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32,
           "cudnn_benchmark": torch.backends.cudnn.benchmark}
    if device.type == "cuda":
        env["capability"] = ".".join(map(str, torch.cuda.get_device_capability(device)))
    return env


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny smoke run (automatic on CPU)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--amp", choices=[c for c in AMP_CHOICES if c != "off"], default="auto",
                   help="mixed precision of (b) and (c) (auto: bf16 on Ampere+, fp16 before)")
    p.add_argument("--compile", choices=("auto", "on", "off"), default="auto",
                   help="torch.compile for (c): auto = on with CUDA, off on CPU")
    p.add_argument("--best-batch", default=None,
                   help="batch of (c): a number (default 256), or 'auto' (runtime."
                   "probe_batch_size: the largest that fits, with a 20%% margin)")
    p.add_argument("--image-size", type=int)
    p.add_argument("--steps", type=int, help="training batches per timed pass")
    p.add_argument("--eval-steps", type=int, help="evaluation batches per timed pass")
    p.add_argument("--repeats", type=int, help="timed passes (median reported); >= 5 on CUDA")
    p.add_argument("--warmup", type=int, help="untimed batches before timing")
    p.add_argument("--cache-images", type=int, help="training images of the cache epoch")
    p.add_argument("--check-amp", action="store_true",
                   help="also run the AMP-vs-fp32 validation loss check on demo data")
    p.add_argument("--no-throughput", action="store_true",
                   help="skip the throughput runs (with --check-amp: the check alone)")
    p.add_argument("--workdir", help="where the cache and demo data go (default: a temporary "
                   "folder, removed afterwards)")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: 1 on CPU, where a "
                   "smoke run on a shared machine otherwise spends its time in OpenMP "
                   "spin-waits; unchanged with CUDA)")
    p.add_argument("--json", metavar="OUT", help="write every number to this JSON file")
    return p.parse_args(argv)


def resolve_sizes(args: argparse.Namespace, device: torch.device) -> Sizes:
    sizes = Sizes.quick() if args.quick else Sizes()
    for name, attr in (("image_size", "image_size"), ("steps", "steps"),
                       ("eval_steps", "eval_steps"), ("repeats", "repeats"),
                       ("warmup", "warmup"), ("cache_images", "cache_train")):
        value = getattr(args, name)
        if value is not None:
            if value < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be positive")
            setattr(sizes, attr, value)
    if args.best_batch not in (None, "auto"):
        sizes.best_batch = int(args.best_batch)
    return sizes


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; returns the exit status (0, or 2 for a missing CUDA device)."""
    args = parse_args(argv)
    threads = torch.get_num_threads()
    wanted = args.threads or (1 if not torch.cuda.is_available() or args.device == "cpu"
                              else threads)
    torch.set_num_threads(wanted)
    try:
        return run(args)
    finally:
        torch.set_num_threads(threads)  # main() is also called in-process by the tests


def run(args: argparse.Namespace) -> int:
    """main() without the thread-count bookkeeping."""
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available()
                          else ("cpu" if args.device == "auto" else args.device))
    if device.type == "cuda" and not torch.cuda.is_available():
        print(f"error: --device {args.device}: no CUDA GPU here", file=sys.stderr)
        return 2
    notes: list[str] = []
    if device.type != "cuda" and not args.quick:
        args.quick = True
        notes.append("no CUDA device: running the --quick smoke version")
    sizes = resolve_sizes(args, device)
    amp = resolve_amp(args.amp, device)
    compile_on = args.compile == "on" or (args.compile == "auto" and device.type == "cuda")

    def say(text: str) -> None:
        print(text, flush=True)

    env = environment(device)
    say(f"# Training throughput: DenseNet-121, {len(FINDINGS)} outputs, {sizes.image_size} px")
    say(f"device: {env['device']}; torch {env['torch']} (CUDA {env['cuda']}); date {env['date']}")
    say(f"fp32 flags: cudnn.allow_tf32={env['cudnn_allow_tf32']}, matmul.allow_tf32="
        f"{env['matmul_allow_tf32']}, cudnn.benchmark={env['cudnn_benchmark']} (PyTorch "
        "defaults, as retrain.py runs)")
    say(f"timing: warm-up {sizes.warmup} batches, then median of {sizes.repeats} passes of "
        f"{sizes.steps} training / {sizes.eval_steps} evaluation batches")
    for note in notes:
        say(note)
    if args.quick:
        say("QUICK SMOKE RUN: tiny sizes; these numbers are not performance figures")
    if device.type == "cpu" and args.amp == "auto":
        say("amp auto on CPU resolves to fp32 (runtime.resolve_amp): (b) and (c) run in fp32")
    if not compile_on and args.compile == "auto":
        say("torch.compile skipped on CPU (pass --compile on to try it)")

    report: dict = {"environment": env, "quick": args.quick, "sizes": asdict(sizes),
                    "notes": notes, "configs": [], "end_to_end": None, "check_amp": None,
                    "best_over_reference_train_speedup": None, "nih_epoch_estimate_s": None}
    with tempfile.TemporaryDirectory(prefix="train_throughput_") as tmp:
        workdir = Path(args.workdir) if args.workdir else Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        results: list[ConfigResult] = []
        if not args.no_throughput:
            results = throughput(args, sizes, device, amp, compile_on, workdir, report, say)
        if args.check_amp:
            check = check_amp(sizes, device, args.amp, workdir, say)
            report["check_amp"] = check
            verdict = "PASS" if check["passed"] else "FAIL"
            if device.type == "cpu":
                verdict += " (CPU smoke run: exercises the code path, not the GPU acceptance)"
            say(f"amp check ({check['amp']} vs fp32, {check['steps']} steps, "
                f"{check['images']} images at {check['image_size']} px, batch {check['batch']}): "
                f"val loss fp32 {check['fp32_val_loss']:.6f}, {check['amp']} "
                f"{check['amp_val_loss']:.6f}, relative difference {check['rel_diff']:.4%} "
                f"(tolerance {AMP_TOLERANCE:.0%}): {verdict}")

    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    if results:
        say("")
        say(markdown_table(results))
        e2e = report["end_to_end"]
        loader = ("CachedImages + DataLoader (pinned, 1 worker)" if device.type == "cuda"
                  else "CachedImages + DataLoader")
        say(f"end-to-end (uint8 cache -> {loader} -> model_input on {device.type}, config "
            f"(c), batch {e2e['batch']}): {e2e['train_img_s']:.1f} img/s training, "
            f"{e2e['val_img_s']:.1f} img/s validation")
        if e2e["nih_val_estimate_s"] is not None:
            say(f"NIH validation pass estimate ({e2e['nih_val_images']:,} images): "
                f"{e2e['nih_val_estimate_s']:.0f} s")
        say(f"device: {env['device']}; torch {env['torch']}; date {env['date']}")
        say(f"best/reference train speedup: {report['best_over_reference_train_speedup']:.1f}x")
        say(f"NIH epoch estimate ({NIH_TRAIN_IMAGES:,} images): "
            f"{report['nih_epoch_estimate_s']:.0f} s")
    return 0


def throughput(args: argparse.Namespace, sizes: Sizes, device: torch.device,
               amp: torch.dtype | None, compile_on: bool, workdir: Path, report: dict,
               say: Callable[[str], None]) -> list[ConfigResult]:
    """Configs (a), (b), (c) and the cache epoch; fills `report` and returns the rows."""
    mixed = f"{dtype_name(amp)} autocast" if amp else "fp32 (AMP resolved to off)"
    configs = [
        BenchConfig("a", "reference: fp32, NCHW", sizes.ref_batch, sizes.eval_batch, None,
                    False, False),
        BenchConfig("b", f"{mixed} + channels_last", sizes.ref_batch, sizes.eval_batch, amp,
                    True, False),
        BenchConfig("c", f"best: {mixed} + channels_last"
                    + (" + torch.compile" if compile_on else " (compile off)"),
                    sizes.best_batch, sizes.best_batch, amp, True, compile_on),
    ]
    results: list[ConfigResult] = []
    for bc in configs[:2]:
        result, trainer = run_config(bc, sizes, device, say)
        results.append(result)
        del trainer
        release()
    best = configs[2]
    if args.best_batch == "auto":
        probe = make_trainer(dataclasses.replace(best, compile=False), device, say)
        best.batch = best.eval_batch = probe_batch_size(
            probe.net, sizes.image_size, len(FINDINGS), device, amp, True)
        del probe
        release()
        say(f"--best-batch auto: {best.batch} (retrain's --batch-size auto would also scale "
            f"the lr to {scaled_lr(TrainConfig().lr, best.batch):g})")
    result, trainer = run_best(best, sizes, device, say)
    results.append(result)
    ref = results[0]
    for r in results:
        r.train_speedup = r.train_img_s / ref.train_img_s
        r.eval_speedup = r.eval_img_s / ref.eval_img_s
    e2e = cache_epoch(trainer, best.batch, sizes, device, workdir, say)
    del trainer
    release()
    report["configs"] = [asdict(r) for r in results]
    report["end_to_end"] = e2e
    report["best_over_reference_train_speedup"] = results[-1].train_speedup
    report["nih_epoch_estimate_s"] = e2e["nih_epoch_estimate_s"]
    return results


if __name__ == "__main__":
    sys.exit(main())
