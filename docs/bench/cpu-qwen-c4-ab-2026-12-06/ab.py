"""A/B of two servers on the real pair (MINEDRAFT configurations, or SGLang's STANDALONE), both alive, visits alternating
(A B, B A, ...), each visit 8 HumanEval prompts x 64 tokens at AB_CONC (default 4) requests in flight.
The script of docs/benchmarks.md's 2026-12-06 19:42-21:43 runs, as run (from the repository root, after
`source launch/cpu_env.sh`):
  ab1: .venv/bin/python ab.py /tmp/ab1 3 seq="sequential" ada="auto --minedraft-k auto"
  ab3: .venv/bin/python ab.py /tmp/ab3 3 seq="sequential" seqauto="sequential --minedraft-k auto"
  ab4: .venv/bin/python ab.py /tmp/ab4 8 seq="sequential" ada="auto --minedraft-k auto"
  ab5 (21:20-21:30): AB_CONC=8 .venv/bin/python ab.py /tmp/ab5 8 seq="sequential" ada="auto --minedraft-k auto"
  ab6 (21:30-21:43): AB_CONC=1 AB_N=4 .venv/bin/python ab.py /tmp/ab6 6 sa="STANDALONE" ada="auto --minedraft-k auto"
  ab7-ab10 (22:30-23:13, docs/bench/cpu-qwen-c1-int8-ab-2026-12-06/): AB_CONC=1 AB_N=4, e.g. ab10: sa="STANDALONE" ada="auto --minedraft-k auto"
  ab11-ab19 (2026-12-07, docs/bench/cpu-qwen-c148-int8-ab-2026-12-07/; NAME.server_info.json from ab19 on): e.g. ab11: AB_CONC=8 ... plain="PLAIN" ada="auto --minedraft-k auto",
  ab12: AB_CONC=8 ... seq="sequential" ada="auto --minedraft-k auto"
  (AB_N: prompts per visit, default 8; AB_TOKENS: tokens per prompt, default 64; a NAME=STANDALONE server is SGLang's own SD at k = 3, as the bench runs it;
  NAME=PLAIN plain decoding, one process x 2 threads)
AB_SAMPLE=1 samples the servers' /proc figures every 0.5 s (one run, ab2, not kept: the sampling slowed them)."""
import json, os, sys, time, shlex
from pathlib import Path
from minedraft_sglang.lab.launcher import Server, minedraft_args
from minedraft_sglang.lab.bench.client import send_all, flush_cache
from minedraft_sglang.lab.bench.plan import make_prompts
out = Path(sys.argv[1]); out.mkdir(parents=True, exist_ok=True)
rounds = int(sys.argv[2])
conc = int(os.environ.get("AB_CONC", "4"))
tokens = int(os.environ.get("AB_TOKENS", "64"))
specs = [a.split("=", 1) for a in sys.argv[3:]]
home = Path.home() / ".cache/minedraft_sglang/real-models"
target, draft = str(home / "qwen2.5-coder-1.5b"), str(home / "qwen2.5-coder-0.5b")
prompts = make_prompts(int(os.environ.get("AB_N", "8")), seed=0, prompt_set="humaneval")
servers = {}
for name, flags in specs:
    words = shlex.split(flags)
    if words[0] == "PLAIN":
        args = ["--model-path", target, "--max-running-requests", "8", "--mem-fraction-static", "0.95", "--dtype", "bfloat16"]
        servers[name] = Server(args, out / f"{name}.log", env={"OMP_NUM_THREADS": "2"}, cores=frozenset({0, 1}))
        continue
    if words[0] == "STANDALONE":  # SGLang's own SD, k = 3, as the bench runs it
        args = ["--model-path", target, "--speculative-algorithm", "STANDALONE", "--speculative-draft-model-path", draft, "--speculative-num-steps", "3", "--speculative-eagle-topk", "1", "--speculative-num-draft-tokens", "4", "--max-running-requests", "8", "--mem-fraction-static", "0.95", "--dtype", "bfloat16"]
        servers[name] = Server(args, out / f"{name}.log", env={"OMP_NUM_THREADS": "2"}, cores=frozenset({0, 1}))
        continue
    args = minedraft_args(target, draft, words[0], 3, ["--max-running-requests", "8", "--minedraft-trace-file", str(out / f"{name}.trace.jsonl"), *words[1:], "--mem-fraction-static", "0.95", "--dtype", "bfloat16"])
    servers[name] = Server(args, out / f"{name}.log", env={"OMP_NUM_THREADS": "2"}, cores=frozenset({0, 1}))
for s in servers.values():
    s.wait_ready(900)
for name, s in servers.items():
    send_all(s.url, prompts, max_new_tokens=64, concurrency=8)
    print("warm", name, flush=True)
names = [n for n, _ in specs]
import threading, psutil
def tree(pid):
    p = psutil.Process(pid)
    return [p, *p.children(recursive=True)]
samples = open(out / "samples.jsonl", "w")
def sampler():
    procs = {n: tree(s.proc.pid) for n, s in servers.items()}
    while True:
        row = {"t": time.monotonic()}
        for n, ps in procs.items():
            for p in ps:
                try:
                    f = open(f"/proc/{p.pid}/stat").read().rsplit(")", 1)[1].split()
                    threads = {}
                    for t in os.listdir(f"/proc/{p.pid}/task"):
                        try:
                            g = open(f"/proc/{p.pid}/task/{t}/stat").read().rsplit(")", 1)[1].split()
                            threads[t] = int(g[11]) + int(g[12])
                        except OSError:
                            pass
                    row[f"{n}:{p.pid}"] = {"minflt": int(f[7]), "majflt": int(f[9]), "cpu": int(f[11]) + int(f[12]), "threads": threads}
                except OSError:
                    pass
        samples.write(json.dumps(row) + "\n"); samples.flush()
        time.sleep(0.5)
if os.environ.get("AB_SAMPLE"): threading.Thread(target=sampler, daemon=True).start()
visits = []
for r in range(rounds):
    for name in (names if r % 2 == 0 else names[::-1]):
        s = servers[name]
        flush_cache(s.url)
        t0 = time.monotonic()
        _, span = send_all(s.url, prompts, max_new_tokens=tokens, concurrency=conc)
        t1 = time.monotonic()
        tok = len(prompts) * tokens / span
        visits.append(dict(name=name, round=r, t0=t0, t1=t1, tok_s=tok))
        print(f"round {r} {name} {tok:.2f} tok/s", flush=True)
json.dump(visits, open(out / "visits.json", "w"))
import requests  # each MINEDRAFT server's own counts (the planner's among them), at the end
for name, s in servers.items():
    state = requests.get(s.url + "/server_info", timeout=30).json()["internal_states"][0]
    if "minedraft" in state:
        json.dump(state["minedraft"], open(out / f"{name}.server_info.json", "w"), indent=1)
for s in servers.values():
    s.stop()
