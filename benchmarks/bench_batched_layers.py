"""What caps ``train_many`` on a CPU: K runs' convolutions and GroupNorms at batch size one, batched or not.

Usage:  python benchmarks/bench_batched_layers.py [--k 8]

For ResNet-20's three layer shapes, forward + backward of K runs (own weights, one sample each) as
(a) K separate calls, (b) ``vmap`` (PyTorch turns a vmapped convolution into one grouped convolution),
(c) for convolutions: one grouped convolution on the runs folded into the channels (what ``train_many``'s
folded stages run), and im2col (``unfold``) + batched matmul; for GroupNorm:
one call with K times the groups (what ``train_many`` uses, :class:`pipeprop.multi_run._RunStackedGroupNorm`).
Prints ms per call; see docs/performance.md, "Many runs at once".
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable

import torch
import torch.nn.functional as F
from torch.func import vmap


def timeit(fn: Callable[[], None], n: int = 20) -> float:
    for _ in range(3):
        fn()
    start = time.perf_counter()
    for _ in range(n):
        fn()
    return 1e3 * (time.perf_counter() - start) / n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--k", type=int, default=8)
    args = ap.parse_args()
    torch.set_num_threads(1)
    k = args.k
    print(f"K = {k} runs, batch size 1, 1 thread, torch {torch.__version__}; ms per forward + backward")
    print(f"{'layer':<22} {'separate':>9} {'vmap':>9} {'other 1':>9} {'other 2':>9}")
    for cin, c, h in ((3, 16, 32), (16, 16, 32), (32, 32, 16), (64, 64, 8)):
        x = torch.randn(k, 1, cin, h, h, requires_grad=True)
        w = torch.randn(k, c, cin, 3, 3, requires_grad=True)

        def separate() -> None:
            torch.cat([F.conv2d(x[i], w[i], padding=1) for i in range(k)]).sum().backward()

        def vmapped() -> None:
            vmap(lambda a, b: F.conv2d(a, b, padding=1))(x, w).sum().backward()

        def grouped() -> None:  # what train_many's folded stages run (pipeprop.multi_run._FoldedConv2d)
            F.conv2d(x.reshape(1, k * cin, h, h), w.reshape(k * c, cin, 3, 3), padding=1, groups=k).sum().backward()

        def im2col() -> None:
            cols = F.unfold(x.reshape(k, cin, h, h), 3, padding=1)
            torch.bmm(w.reshape(k, c, cin * 9), cols).sum().backward()

        times = [statistics.median(timeit(f, 10) for _ in range(5)) for f in (separate, vmapped, grouped, im2col)]
        print(f"{f'conv3x3 {cin}->{c}ch {h}x{h}':<22} " + " ".join(f"{t:>9.2f}" for t in times)
              + "   (3: one grouped conv, used; 4: unfold+bmm)")
    for c, h in ((16, 32), (64, 8)):
        g = min(8, c)
        x = torch.randn(k, 1, c, h, h, requires_grad=True)
        wt = torch.randn(k, c, requires_grad=True)
        bs = torch.randn(k, c, requires_grad=True)

        def gn_separate() -> None:
            torch.stack([F.group_norm(x[i], g, wt[i], bs[i]) for i in range(k)]).sum().backward()

        def gn_vmapped() -> None:
            vmap(lambda a, ww, bb: F.group_norm(a, g, ww, bb))(x, wt, bs).sum().backward()

        def gn_flat() -> None:
            F.group_norm(x.reshape(1, k * c, h, h), k * g, wt.reshape(-1), bs.reshape(-1)).sum().backward()

        times = [timeit(f, 50) for f in (gn_separate, gn_vmapped, gn_flat)]
        print(f"{f'groupnorm {c}ch {h}x{h}':<22} " + " ".join(f"{t:>9.2f}" for t in times) + "             (3: K x the groups in one call)")


if __name__ == "__main__":
    main()
