"""Fresh processes each streaming 3.2 GB of bf16 weights through GEMMs of 4 columns (a decode step's
memory traffic), alternating without/with THP_MEM_ALLOC_ENABLE=1 (PyTorch's CPU allocator then asks for
transparent huge pages): median step time per process. Run 2026-12-06 21:17 as
`source launch/cpu_env.sh; .venv/bin/python memstream.py 6 rows.json` (docs/benchmarks.md)."""
import json, os, subprocess, sys, time
CHILD = r'''
import time, torch, statistics, json
torch.set_num_threads(2)
ws = [torch.randn(4096, 4096).to(torch.bfloat16) for _ in range(100)]
x = torch.randn(4096, 4, dtype=torch.bfloat16)
times = []
for _ in range(25):
    t = time.perf_counter()
    for w in ws:
        w @ x
    times.append(time.perf_counter() - t)
huge = 0
for line in open("/proc/self/smaps_rollup"):
    if line.startswith("AnonHugePages"):
        huge = int(line.split()[1])
print(json.dumps({"median_ms": statistics.median(times[5:]) * 1e3, "min_ms": min(times) * 1e3, "anon_huge_kb": huge}))
'''
n = int(sys.argv[1])
rows = []
for i in range(n):
    for arm in ("default", "thp"):
        env = {**os.environ, "OMP_NUM_THREADS": "2"}
        env.pop("THP_MEM_ALLOC_ENABLE", None)
        if arm == "thp":
            env["THP_MEM_ALLOC_ENABLE"] = "1"
        out = subprocess.run([sys.executable, "-c", CHILD], env=env, capture_output=True, text=True, check=True).stdout
        row = {"i": i, "arm": arm, **json.loads(out.strip().splitlines()[-1])}
        rows.append(row)
        print(json.dumps(row), flush=True)
json.dump(rows, open(sys.argv[2], "w"))
