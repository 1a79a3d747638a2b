"""The distributed engine equals the simulator on a graph-captured nn.Module whose skip connection crosses
a rank boundary (2 ranks, gloo on CPU)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import pipeprop
from pipeprop.distributed import PipelineComm, build_pipeline

from test_distributed import read_error, run_procs

METHODS = ("pb", "pb+sc+lwp", "pb+stash")
N = 10


class ResMLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp, self.fc1, self.fc2, self.out = nn.Linear(5, 6), nn.Linear(6, 6), nn.Linear(6, 6), nn.Linear(6, 3)

    def forward(self, x):
        h = torch.tanh(self.inp(x))
        skip = h
        h = torch.tanh(self.fc1(h))
        h = self.fc2(h)
        h += skip
        return self.out(torch.relu(h))


EXAMPLE = torch.zeros(2, 5, dtype=torch.float64)


def make_model() -> ResMLP:
    torch.manual_seed(0)
    return ResMLP().double()


def make_partition() -> pipeprop.Partition:
    return pipeprop.partition(make_model(), "layer", example_input=EXAMPLE)


def make_batches():
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(2, 5, generator=g, dtype=torch.float64), torch.randint(0, 3, (2,), generator=g)) for _ in range(N)]


def _job(comm: PipelineComm, out: str) -> None:
    results: dict[str, Any] = {}
    for method in METHODS:
        # ranks hold stages 0-1 and 2-3: the message from rank 0 carries stage 1's output and the skip
        engine = build_pipeline(make_model(), F.cross_entropy, comm=comm, method=method, lr=0.1, momentum=0.9,
                                assignment="2,2", sample_input=EXAMPLE)
        stats = engine.run(make_batches(), N)
        results[method] = {
            "params": {slot.index: [p.detach().clone() for p in slot.params] for slot in engine.slots},
            "losses": stats.losses,
        }
    torch.save(results, Path(out, f"rank{comm.rank}.pt"))


@pytest.mark.slow
def test_distributed_equals_simulator_on_graph_captured_skip_across_ranks(tmp_path: Path) -> None:
    part = make_partition()
    assert len(part) == 4 and len(part[1](part[0](make_batches()[0][0]))) == 2  # skip travels past stage 1
    codes = run_procs(_job, 2, tmp_path, timeout=60.0)
    errors = {r: read_error(tmp_path, r)[1] for r in range(2) if Path(tmp_path, f"err{r}.txt").exists()}
    assert codes == [0, 0], f"ranks failed: {codes} {errors}"
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for method in METHODS:
        ref = make_partition()
        sim = pipeprop.build_simulator(ref, F.cross_entropy, method=method, lr=0.1, momentum=0.9)
        losses = [sim.step(x, y) for x, y in make_batches()]
        seen = set()
        for res in ranks:
            for s, params in res[method]["params"].items():
                seen.add(s)
                for got, want in zip(params, list(ref[s].parameters()), strict=True):
                    torch.testing.assert_close(got, want.detach(), rtol=1e-12, atol=1e-13, msg=f"{method} stage {s}")
        assert seen == {0, 1, 2, 3}
        torch.testing.assert_close(torch.tensor(ranks[-1][method]["losses"]), torch.tensor(losses), rtol=1e-12, atol=0)
