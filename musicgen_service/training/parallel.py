"""Data parallel training: one process per GPU (or, in tests, CPU processes over gloo), each with its
share of every update's segments, the LM under ``DistributedDataParallel`` (:mod:`.loop`).

Two ways to get the processes:

- **spawned** (:func:`train_processes`): one machine; the run's process prepares the dataset and
  its tokens, then starts ``world`` workers (``torch.multiprocessing.spawn``, a rendezvous on
  127.0.0.1) that read them from a file;
- **launched** (:class:`Launch`): ``torchrun`` (or Slurm, Kubernetes... with its conventions:
  ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``/``MASTER_PORT``) started every process,
  on one machine or many. Rank 0 prepares the dataset and its tokens and sends them to the others
  over the process group (:meth:`Launch.share`: the dataset need only be on rank 0's machine, the
  base model's weights on every machine), all train, rank 0 writes the trained file."""

from __future__ import annotations

import contextlib
import io
import socket
import typing as tp
from dataclasses import dataclass
from pathlib import Path

import torch

from ..core.settings import Settings
from ..weights import hub as weights
from . import adapters, allocator, base_model, loop, tokens
from .options import Options


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train_worker(
    rank: int, world: int, backend: str, port: int, settings: Settings, o: Options, features_path: str, result_path: str
) -> None:
    """One process of a data-parallel run (``torch.multiprocessing.spawn``)."""
    import torch.distributed as dist

    device = f"cuda:{rank}" if backend == "nccl" else "cpu"
    if device == "cpu":
        allocator.map_large_blocks()
    if backend == "nccl":
        torch.cuda.set_device(rank)
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        weights.use_hub_cache(settings.weights_dir)
        model = base_model.load(settings, o.base_model, device)
        features = tokens.Features.load(features_path)
        params, loras = base_model.trainable(model, o, o.seed)
        history = loop.train(model.lm, features, o, params, rank=rank, world=world)
        if rank == 0:
            state = adapters.state(loras) if loras else {n: p.detach().cpu() for n, p in model.lm.named_parameters()}
            torch.save(
                {
                    "state": state,
                    "losses": history.losses,
                    "lrs": history.learning_rates,
                    "grad_norms": history.grad_norms,
                    "seconds": history.seconds,
                    "tokens": history.tokens * world,
                    "last": history.last,
                },
                result_path,
            )
    finally:
        dist.destroy_process_group()


def train_processes(
    settings: Settings, o: Options, features: tokens.Features, world: int, backend: str, work: Path
) -> tp.Tuple[tp.Dict[str, torch.Tensor], loop.History]:
    """The run in ``world`` processes (data parallel); returns what rank 0 kept and its history."""
    import torch.multiprocessing as mp

    features_path, result_path = work / "features.pt", work / "result.pt"
    features.save(features_path)
    mp.spawn(
        train_worker,
        args=(world, backend, _free_port(), settings, o, str(features_path), str(result_path)),
        nprocs=world,
        join=True,
    )
    out = torch.load(result_path, weights_only=True)
    history = loop.History(
        losses=out["losses"],
        learning_rates=out["lrs"],
        grad_norms=out["grad_norms"],
        seconds=out["seconds"],
        tokens=out["tokens"],
        last=out["last"],
    )
    return out["state"], history


@dataclass(frozen=True)
class Launch:
    """This process's place in a launched run (torchrun's variables, read by :mod:`..core.settings`)."""

    rank: int
    world: int
    local_rank: int

    @classmethod
    def of(cls, settings: Settings) -> tp.Optional["Launch"]:
        """The launch this process is part of (None: a run of its own)."""
        if settings.process_world <= 1:
            return None
        return cls(settings.process_rank, settings.process_world, settings.process_local_rank)

    def device(self, device: str) -> str:
        """This process's device: its local GPU, or the CPU."""
        if device.startswith("cuda"):
            torch.cuda.set_device(self.local_rank)
            return f"cuda:{self.local_rank}"
        return "cpu"

    @contextlib.contextmanager
    def joined(self, backend: str) -> tp.Iterator[None]:
        """Within the block, this process is in the run's process group (the rendezvous at
        ``MASTER_ADDR:MASTER_PORT``, which torch reads from the environment)."""
        import torch.distributed as dist

        dist.init_process_group(backend, init_method="env://", rank=self.rank, world_size=self.world)
        try:
            yield
        finally:
            dist.destroy_process_group()

    def share(self, features: tp.Optional[tokens.Features], failure: tp.Optional[str] = None) -> tokens.Features:
        """Rank 0's features on every rank (``features`` on rank 0, None elsewhere); ``failure``:
        why rank 0 has none (a bad dataset), raised on every rank so that none waits for ever."""
        import torch.distributed as dist

        payload: tp.List[tp.Any] = [None]
        if self.rank == 0:
            if features is None:
                payload = [("failed", failure or "rank 0 could not prepare the dataset")]
            else:
                buffer = io.BytesIO()
                features.save(buffer)
                payload = [("features", buffer.getvalue())]
        dist.broadcast_object_list(payload, src=0)
        kind, value = payload[0]
        if kind == "failed":
            raise RuntimeError(f"training process {self.rank}: {value}")
        return features if self.rank == 0 and features is not None else tokens.Features.load(io.BytesIO(value))
