"""The distributed engine equals the simulator with AdamW, and with NAdam for AsyncPP (2 ranks, gloo, float64).

Uses only the engine's public entry points: ``PipelineComm.from_env``, ``build_pipeline`` and
``DistributedPipeline.run``.
"""

from __future__ import annotations

import datetime
import os
import socket
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

import pipeprop

METHODS = ("pb", "pb+stash", "pb+sc", "pb+lwp", "pb+sc+lwp", "asyncpp")
N = 12
HP = dict(optimizer="adamw", lr=0.01, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.05)


def hparams(method: str) -> dict:
    """AdamW for every method, NAdam (its only optimizer) for AsyncPP."""
    return dict(HP, optimizer="nadam", beta1_target=0.99) if method == "asyncpp" else HP


def make_model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 7), nn.ReLU(), nn.Linear(7, 5), nn.Tanh(),
                         nn.Linear(5, 3)).double()


def make_batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(2, 6, generator=g, dtype=torch.float64), torch.randint(0, 3, (2,), generator=g)) for _ in range(N)]


def _rank(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    import torch.distributed as dist

    from pipeprop.distributed import PipelineComm, build_pipeline

    try:
        dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=120))
        comm = PipelineComm.from_env(60.0)
        results = {}
        for method in METHODS:
            engine = build_pipeline(make_model(), F.cross_entropy, comm=comm, method=method, assignment="2,2",
                                    **hparams(method))
            stats = engine.run(make_batches(), N)
            results[method] = {"params": {slot.index: [p.detach().clone() for p in slot.params] for slot in engine.slots},
                               "losses": stats.losses}
        torch.save(results, Path(out, f"rank{rank}.pt"))
        dist.barrier()
        dist.destroy_process_group()
    except BaseException as err:  # noqa: BLE001 - report and leave at once
        Path(out, f"err{rank}.txt").write_text(f"{type(err).__name__}: {err}")
        os._exit(1)
    os._exit(0)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_distributed_engine_equals_simulator_with_adamw(tmp_path: Path) -> None:
    ctx = mp.get_context("spawn")
    port = _free_port()
    procs = [ctx.Process(target=_rank, args=(r, 2, port, str(tmp_path))) for r in range(2)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and any(p.is_alive() for p in procs):
        time.sleep(0.05)
    for p in procs:
        if p.is_alive():
            p.kill()
        p.join()
    errors = [Path(tmp_path, f"err{r}.txt").read_text() for r in range(2) if Path(tmp_path, f"err{r}.txt").exists()]
    assert [p.exitcode for p in procs] == [0, 0], errors
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for method in METHODS:
        sim = pipeprop.build_simulator(make_model(), F.cross_entropy, method=method, **hparams(method))
        assert isinstance(sim.optimizer, pipeprop.PipelineAdam)
        want_losses = [sim.step(x, y) for x, y in make_batches()]
        want = [[p.detach() for p in st.parameters()] for st in sim.stages]
        seen = set()
        for res in ranks:
            for s, params in res[method]["params"].items():
                seen.add(s)
                for got, ref in zip(params, want[s], strict=True):
                    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-14, msg=f"{method} stage {s}")
        assert seen == set(range(len(want)))
        torch.testing.assert_close(torch.tensor(ranks[-1][method]["losses"]), torch.tensor(want_losses), rtol=1e-12, atol=0)
