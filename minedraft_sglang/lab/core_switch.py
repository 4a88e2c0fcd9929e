"""What moving a thread team between core sets costs, per step (docs/design.md, "Cores follow the step").

    python -m minedraft_sglang.lab.core_switch [--layers 8] [--repeats 40]

A decode-shaped forward (bfloat16 matrix-vector products over ``--layers`` 1536 x 8960 weights, as in the
1.5B target's MLP) runs on one ``affinity.Team``: steadily on every core, steadily on one core, and right
after each switch from one core to every core (``Team.use``, as a step that follows an overlapped one does).
Prints the medians and the cost of ``Team.use`` itself. Run it alone on the machine.
"""

from __future__ import annotations

import argparse
import os
import time
from statistics import median

import torch

from minedraft_sglang.cpu.affinity import Team, format_cores


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m minedraft_sglang.lab.core_switch", description=__doc__)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--repeats", type=int, default=40)
    args = p.parse_args(argv)
    every = frozenset(os.sched_getaffinity(0))
    one = frozenset({min(every)})
    weights = [torch.randn(1536, 8960, dtype=torch.bfloat16) for _ in range(args.layers)]
    x = torch.randn(1, 1536, dtype=torch.bfloat16)

    def forward_ms() -> float:
        t0 = time.perf_counter()
        for w in weights:
            x @ w
        return 1000 * (time.perf_counter() - t0)

    team = Team.discover(every)
    for _ in range(5):
        forward_ms()
    steady_all = [forward_ms() for _ in range(args.repeats)]
    team.use(one)
    steady_one = [forward_ms() for _ in range(args.repeats)]
    after_switch, switch_us = [], []
    for _ in range(args.repeats):
        team.use(one)
        forward_ms()
        t0 = time.perf_counter()
        team.use(every)
        switch_us.append(1e6 * (time.perf_counter() - t0))
        after_switch.append(forward_ms())
    print(f"cores {format_cores(every)}, team threads {1 + len(team.workers)}, load {os.getloadavg()[0]:.2f}")
    print(f"forward on every core, steady:        {median(steady_all):7.2f} ms")
    print(f"forward on one core, steady:          {median(steady_one):7.2f} ms")
    print(f"forward on every core, after switch:  {median(after_switch):7.2f} ms")
    print(f"Team.use (pin {1 + len(team.workers)} threads, set threads): {median(switch_us):7.1f} us")


if __name__ == "__main__":
    main()
