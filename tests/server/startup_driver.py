"""Runs many startup-error cases in one process, as ``python -m sglang.launch_server`` starts: plugins
loaded, then ``prepare_server_args(argv)``, where MINEDRAFT refuses bad input (one SGLang import for all
cases instead of one per case). Reads a JSON list of argv lists on stdin; prints, per case, a JSON
object: ``exit`` (the SystemExit code or message, or null if it returned), ``stderr`` (what it printed),
``raised`` (another exception's type and message, or null). Run with the environment of
``minedraft-sglang-cpu``."""

import contextlib
import io
import json
import os
import sys

from sglang.srt.plugins import load_plugins
from sglang.srt.server_args import prepare_server_args

from minedraft_sglang.cpu.server import CPU_FLAGS

load_plugins()
environ = dict(os.environ)
for argv in json.load(sys.stdin):
    # The plugin passes its settings on through the environment: each case starts from the same one.
    os.environ.clear()
    os.environ.update(environ)
    stderr, out = io.StringIO(), {"exit": None, "raised": None}
    try:
        with contextlib.redirect_stderr(stderr):
            prepare_server_args([*CPU_FLAGS, *argv])
    except SystemExit as e:
        out["exit"] = e.code if isinstance(e.code, (int, str)) else repr(e.code)
    except Exception as e:  # noqa: BLE001 - reported, and the test fails on it
        out["raised"] = f"{type(e).__name__}: {e}"
    out["stderr"] = stderr.getvalue()
    print(json.dumps(out), flush=True)
