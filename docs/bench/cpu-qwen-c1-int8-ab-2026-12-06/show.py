"""Per visit of an ab.py run: tok/s, and for MINEDRAFT servers the steps' modes and median draft/verify/step ms.
Usage: show.py RUN_DIR [A B] (the ratio printed is B / A; default: the two names in alphabetical order)."""
import json, sys, statistics, collections, math
d = sys.argv[1]
visits = json.load(open(f"{d}/visits.json"))
traces = {}
import glob, os
for f in glob.glob(f"{d}/*.trace.jsonl"):
    traces[os.path.basename(f).split(".")[0]] = [json.loads(l) for l in open(f)]
for v in visits:
    line = f"r{v['round']} {v['name']:8s} {v['tok_s']:6.2f} tok/s"
    steps = [s for s in traces.get(v["name"], []) if v["t0"] <= s["verify"][0] <= v["t1"]]
    if steps:
        modes = collections.Counter(f"{s['mode'][:3]}{s['k']}" for s in steps)
        med = lambda xs: statistics.median(xs) * 1000 if xs else float("nan")
        seq = [s for s in steps if s["mode"] == "sequential"]
        line += f"  steps {len(steps)} {dict(modes)}  seq draft {med([s['draft'][1]-s['draft'][0] for s in seq]):.0f} verify {med([s['verify'][1]-s['verify'][0] for s in seq]):.0f} step {med([s['step_seconds'] for s in seq]):.0f} ms acc {statistics.mean([a for s in steps for a in s['accept_lens']]):.2f}"
    print(line)
names = sys.argv[2:4] or sorted({v["name"] for v in visits})
if len(names) == 2:
    a, b = names
    by = collections.defaultdict(dict)
    for v in visits: by[v["round"]][v["name"]] = v["tok_s"]
    r = [by[k][b] / by[k][a] for k in sorted(by) if a in by[k] and b in by[k]]
    lg = [math.log(x) for x in r]
    m = statistics.mean(lg); se = statistics.stdev(lg) / math.sqrt(len(lg)) if len(lg) > 1 else float("nan")
    from scipy import stats as st
    t = st.t.ppf(0.975, len(lg) - 1) if len(lg) > 1 else float("nan")
    print(f"{b}/{a} per pair: {' '.join(f'{x:.2f}' for x in r)}; geomean {math.exp(m):.3f} (95% {math.exp(m-t*se):.3f}-{math.exp(m+t*se):.3f}), median {statistics.median(r):.2f}")
