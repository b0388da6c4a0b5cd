"""One training job across the processes of one ``accelerate launch`` (or ``torchrun``).

Under ``accelerate launch --num_processes N -m big5.cli worker`` every process runs the CLI. Only the
main process (rank 0) talks to the database, reads the dataset and writes the adapter store: it
claims a job, prepares each adapter's examples and sends them, with the resume point, to the other
ranks. Every rank then calls the same :func:`trainer.train.train_adapter`, where TRL's Trainer runs
data parallelism over the ranks (DDP through Accelerate); rank 0 saves, registers and publishes.

Orders travel over a gloo process group of their own (``torch.distributed.broadcast_object_list``),
so ranks waiting for the next order do not hold an NCCL collective, and its timeout is a setting.
While the queue is empty the main process sends an ``idle`` order every poll, so the followers
never wait longer than the time it takes to load a dataset or publish an adapter.

A rank that fails while the ranks train together cannot be skipped: the others would wait in a
collective forever. The main process records the failure (the job goes back to the queue) and the
launch ends with an error, as torchrun ends every rank when one fails. Run the launch under a
supervisor (``restart: unless-stopped``, systemd) like any worker.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, Literal

from big5core.training import TrainSpec

logger = logging.getLogger(__name__)


class RanksOutOfStep(RuntimeError):
    """A failure while all ranks were training together; the launch must end."""


def launched_world_size() -> int:
    """How many processes the launcher started (1 outside ``accelerate launch``/``torchrun``)."""
    try:
        return max(int(os.environ.get("WORLD_SIZE", "1")), 1)
    except ValueError:
        return 1


@dataclass
class Order:
    """What the main process tells the other ranks to do next."""

    kind: Literal["idle", "train", "stop"]
    spec: TrainSpec | None = None
    data: Any = None  # trainer.train.PreparedData
    base_model_path: str = ""
    checkpoint_dir: Path | None = None
    resume: str | None = None


class RankGroup:
    """The processes of one launch, seen from one of them."""

    def __init__(self, timeout_seconds: float) -> None:
        import torch
        import torch.distributed as dist
        from accelerate import PartialState

        # Initialises the default process group (gloo on CPUs, NCCL on GPUs) exactly as the
        # Trainer's own TrainingArguments would; the Trainer reuses it.
        self.state = PartialState(cpu=not torch.cuda.is_available())
        if not dist.is_initialized():
            raise RuntimeError("WORLD_SIZE > 1 but no process group could be initialised")
        self.rank = self.state.process_index
        self.world_size = self.state.num_processes
        self._orders = dist.new_group(backend="gloo", timeout=timedelta(seconds=timeout_seconds))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def send(self, order: Order) -> None:
        """Main process only: broadcast the next order."""
        assert self.is_main
        self._broadcast(order)

    def receive(self) -> Order:
        """Other ranks: wait for the main process's next order."""
        assert not self.is_main
        return self._broadcast(None)

    def _broadcast(self, order: Order | None) -> Order:
        import torch.distributed as dist

        box: list[Any] = [order]
        dist.broadcast_object_list(box, src=0, group=self._orders)
        return box[0]

    def close(self) -> None:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def join_launch(timeout_seconds: float) -> RankGroup | None:
    """The rank group when started by a launcher with several processes, else None."""
    if launched_world_size() <= 1:
        return None
    group = RankGroup(timeout_seconds)
    logger.info("rank %d of %d", group.rank, group.world_size)
    return group


def follow(group: RankGroup) -> int:
    """Run a non-main rank: train whatever the main process orders until it says stop.

    Returns how many adapters this rank helped train.
    """
    from trainer.train import train_adapter

    trained = 0
    while True:
        order = group.receive()
        if order.kind == "stop":
            return trained
        if order.kind == "idle":
            continue
        assert order.spec is not None and order.checkpoint_dir is not None
        train_adapter(
            order.spec,
            order.data,
            order.base_model_path,
            None,  # only the main process saves
            order.checkpoint_dir,
            resume=order.resume,
            show_progress_bar=False,
        )
        trained += 1
