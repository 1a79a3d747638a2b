"""Run-driver throughput (samples/s of ``Runner.run``) of two source trees, interleaved, one thread each.

Compares the training loop of two checkouts of pipeprop (e.g. before and after a change to the run driver)
on the digits MLP and on ResNet-20-GN with CIFAR-10, both at micro-batch 1 with method ``pb``. Every round
runs each case once per source tree, alternating, in fresh processes; the table gives the median
samples/s of each and their ratio (second / first); a run that diverges fails the benchmark. Evaluations
hardly count (one at the start and one at the end, on 50 test images); the rate is samples / the run's
``wall_seconds``.

    python benchmarks/bench_runner_sync.py --src /path/to/old/src --src src --data-dir ../shared/data --rounds 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

CASES = {
    "digits-mlp": dict(model="mlp", model_options={"depth": 6, "hidden": 64}, dataset="digits", samples=3000, lr=0.01),
    # the b = 1 learning rate of the B = 128 recipe (0.1 / 128): larger ones diverge within 50 steps
    "resnet20-gn": dict(model="resnet20", norm="gn", dataset="cifar10", samples=300, lr=0.00078125),
}

CHILD = """
import json, sys, torch
from pipeprop.experiments import ExperimentConfig, Runner
torch.set_num_threads(1)
opts = json.loads(sys.argv[1])
cfg = ExperimentConfig(**opts, method="pb", batch_size=1, micro_batch=1, momentum=0.9, schedule="constant",
                       eval_every=opts["samples"], checkpoint_every=opts["samples"], test_subset=50, progress=False)
summary = Runner(cfg, sys.argv[2]).setup().run()
assert summary["status"] == "completed", f"the timed run must not diverge: {summary['status']}"
print(json.dumps({"samples": summary["samples"], "seconds": summary["wall_seconds"]}))
"""


def run_case(src: str, case: str, data_dir: str) -> float:
    opts = dict(CASES[case])
    if opts["dataset"] != "digits":
        opts["data_dir"] = data_dir
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "PYTHONPATH": str(Path(src).resolve()), "OMP_NUM_THREADS": "1"}
        out = subprocess.run([sys.executable, "-c", CHILD, json.dumps(opts), str(Path(tmp) / "run")], env=env,
                             capture_output=True, text=True, check=True)
    res = json.loads(out.stdout.strip().splitlines()[-1])
    return res["samples"] / res["seconds"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--src", action="append", required=True, help="a source tree (the folder holding pipeprop/); twice")
    ap.add_argument("--data-dir", default="../shared/data")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--cases", default=",".join(CASES))
    args = ap.parse_args()
    if len(args.src) != 2:
        ap.error("give --src twice: the baseline tree, then the tree to compare")
    cases = args.cases.split(",")
    rates: dict[tuple[str, int], list[float]] = {(c, k): [] for c in cases for k in range(2)}
    for r in range(args.rounds):
        for c in cases:
            for k in ((0, 1) if r % 2 == 0 else (1, 0)):  # alternate which tree goes first
                rates[c, k].append(run_case(args.src[k], c, args.data_dir))
                print(f"round {r + 1} {c} src{k + 1}: {rates[c, k][-1]:.1f} samples/s", file=sys.stderr, flush=True)
    print("| case | src1 samples/s | src2 samples/s | src2 / src1 |\n|---|---|---|---|")
    for c in cases:
        a, b = statistics.median(rates[c, 0]), statistics.median(rates[c, 1])
        print(f"| {c} | {a:.1f} | {b:.1f} | {b / a:.3f} |")


if __name__ == "__main__":
    main()
