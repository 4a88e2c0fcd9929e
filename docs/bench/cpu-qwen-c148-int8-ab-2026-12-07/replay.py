"""The planner's rates replayed from an ab.py trace: `replay.py TRACE STEPS` feeds a fresh KPlanner (k_max 3,
2 cores, the drafter's split 1) what the first STEPS trace lines measured, and prints the fits at 1-8
requests and the rates of sequential k3, draft-ahead k3 and plain at 1 request. Approximate: the trace
does not hold a step's drafter prefill (counted in its draft here) nor a draft-ahead step's drafts for
missed guesses (left out here). It calls no choose(): the fits and rates only.
  .venv/bin/python replay.py ab14/ada.trace.jsonl 27   (the step before draft-ahead took over)"""
import json, sys
from minedraft_sglang.adaptive_k import KPlanner, Option
from minedraft_sglang.metrics import StepMode
tr=[json.loads(l) for l in open(sys.argv[1])]
upto=int(sys.argv[2])
p=KPlanner(k_max=3, total_cores=2, draft_core_counts=[1])
for s in tr[:upto]:
    p.decisions += 1
    bs,k=s['verify_bs'],s['k']
    p.observe_verify(s['verify_cores'], bs*(k+1), s['verify'][1]-s['verify'][0], bs)
    d=s['draft'][1]-s['draft'][0]
    if s['mode']=='sequential' and k and d>0: p.observe_draft(2, bs, k, d)
    if s['mode'] in ('psd','draft_ahead'): p.observe_draft(1, s['draft_bs'], k+1 if s['mode']=='draft_ahead' else k, d)
    if k: p.observe_acceptance([n-1 for n in s['accept_lens']],[k]*bs)
print('alpha', round(p.alpha,3))
for c,f in p.verify.items(): print('verify', c, [round(f(4*r, r),3) for r in (1,2,4,8)])
for c,f in p.draft.items(): print('draft', c, [round(f(r),3) for r in (1,2,4,8)])
for o in [Option(StepMode.SEQUENTIAL,3), Option(StepMode.DRAFT_AHEAD,3,1), Option(StepMode.PLAIN,0)]:
    print(o.mode.value, o.k, round(p.rate(o,1,0),2))
