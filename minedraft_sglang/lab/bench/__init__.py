"""The side-by-side benchmark (``python -m minedraft_sglang.lab.bench``):
plain, STANDALONE, MINEDRAFT sequential and psd on the same models, prompts
and concurrency. Manual: docs/lab.md.

plan (what to run) -> servers and client (how) -> measure (the rounds) ->
aggregate (numbers per run) -> report (table, JSON, cost model) and plots.
"""
