"""One training step under torchrun, for tests/test_distributed.py: each process saves its model.

    python -m torch.distributed.run --nproc_per_node 2 tests/ddp_step.py OUT

The step is the library's own (`train.train_one_epoch` over one batch, on a model wrapped as
`train.start_run` wraps it). Process r takes items r, r + world, ... of one global batch, as
`train.EpochSampler` deals them, and writes OUT/rank{r}.pt. The test recomputes the same step in
one process from the same batch and compares.

Then each process evaluates its share of the batch with `train.evaluate`, given the bare model
(not the DistributedDataParallel wrapper, whose first forward after training happens to
broadcast process 0's buffers as well), and writes the model it evaluated with to
OUT/rank{r}_eval.pt: evaluate itself must make it process 0's.
"""
from __future__ import annotations

import chexnet.idle_threads  # noqa: F401  (first, before torch loads: idle threads sleep)

import sys
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

BATCH, SIZE, SEED = 16, 32, 7


def global_batch() -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """16 uint8 images, each symmetric left-right so that the training flip changes nothing
    (which images it flips is tested elsewhere), and 0/1 targets for the 14 findings."""
    g = torch.Generator().manual_seed(SEED)
    half = torch.randint(0, 256, (BATCH, 1, SIZE, SIZE // 2), generator=g, dtype=torch.uint8)
    images = torch.cat([half, half.flip(-1)], dim=-1)
    targets = (torch.rand(BATCH, 14, generator=g) < 0.3).float()
    return images, targets, [f"img{i}.png" for i in range(BATCH)]


def initial_model() -> nn.Module:
    from chexnet.model import build_model

    torch.manual_seed(SEED)
    return build_model(14, "none")


class Batch(Dataset):
    """One process's share of the batch as a dataset, for `train.evaluate`."""

    findings = tuple(f"finding{k}" for k in range(14))

    def __init__(self, images: torch.Tensor, targets: torch.Tensor, ids: list[str]):
        self.images, self.targets, self.ids = images, targets, ids

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int):
        return self.images[i], self.targets[i], self.ids[i]


def main(out: Path) -> int:
    from chexnet.runtime import init_distributed, shutdown_distributed
    from chexnet.config import TrainConfig
    from chexnet.runs import EpochProgress
    from chexnet.train import evaluate, make_optimizer, train_one_epoch

    torch.set_num_threads(1)  # the test's single-process replay uses one thread too
    ctx = init_distributed("cpu")
    images, targets, ids = global_batch()
    net = initial_model()
    model = nn.parallel.DistributedDataParallel(net) if ctx.enabled else net
    optimizer = make_optimizer(net.parameters(), TrainConfig())
    r, w = ctx.rank, ctx.world
    batch = [(images[r::w], targets[r::w], ids[r::w])]
    train_one_epoch(model, batch, optimizer, torch.device("cpu"), EpochProgress(epoch=1),
                    seed=SEED, ctx=ctx)
    torch.save(net.state_dict(), out / f"rank{r}.pt")
    evaluate(net, DataLoader(Batch(*batch[0]), batch_size=4), torch.device("cpu"), ctx=ctx)
    torch.save(net.state_dict(), out / f"rank{r}_eval.pt")
    shutdown_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1])))
