"""The real asynchronous Pipelined Backpropagation engine on ``torch.distributed`` (c10d).

Each process (rank) owns a contiguous range of pipeline stages and runs the schedule of
:mod:`pipeprop.schedule` with no flush; activations travel downstream and errors upstream by async
point-to-point messages (gloo on CPU, NCCL on GPU). With the same model, partition, seed and method a
run equals :class:`pipeprop.PipelineSimulator` (bit for bit in float64 on CPU).

Launch::

    pipeprop train --engine distributed --nproc 2 --model mlp ... --out runs/d   # spawns torchrun itself
    torchrun --nproc_per_node=2 -m pipeprop.distributed --model mlp ... --out runs/d
    pipeprop.distributed.launch(2, {"model": "mlp", ...}, "runs/d")             # the same from Python

All three write an ordinary run folder (``config.json``, ``metrics.jsonl``, ``summary.json``, plots,
``checkpoint/rank<r>.pt``), so ``pipeprop report``/``compare`` and ``--resume`` work as for the simulator.
In your own ``torchrun`` script: ``init_process_group``, :meth:`PipelineComm.from_env`,
:func:`build_pipeline`, then :meth:`DistributedPipeline.run`.
"""

from .assignment import assign_stages, balance_stages, measure_stage_times, stage_costs
from .build import build_pipeline, check_method
from .comm import PeerLostError, PeerTimeoutError, PipelineComm, PipelineCommError
from .engine import DistributedPipeline, RunStats

__all__ = [
    "DistributedPipeline",
    "RunStats",
    "PipelineComm",
    "PipelineCommError",
    "PeerTimeoutError",
    "PeerLostError",
    "build_pipeline",
    "check_method",
    "assign_stages",
    "balance_stages",
    "stage_costs",
    "measure_stage_times",
    "launch",
    "run_distributed",
    "DistributedRunError",
]


def __getattr__(name: str):
    if name in ("launch", "run_distributed", "DistributedRunError"):
        from . import launcher

        return getattr(launcher, name)
    raise AttributeError(name)
