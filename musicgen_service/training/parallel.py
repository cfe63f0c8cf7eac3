"""Data parallel training: one process per GPU (or, in tests, CPU processes over gloo), each with its
share of every update's segments, the LM under ``DistributedDataParallel`` (:mod:`.loop`)."""

from __future__ import annotations

import socket
import typing as tp
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
