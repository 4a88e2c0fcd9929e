"""``python -m minedraft_sglang.lab.bench``: the benchmark's command line
(minedraft_sglang.lab.bench.cli). Manual: docs/lab.md."""

import sys

from minedraft_sglang.lab.bench.cli import main

if __name__ == "__main__":
    sys.exit(main())
