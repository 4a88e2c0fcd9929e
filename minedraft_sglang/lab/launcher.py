"""Start and stop real SGLang servers on CPU (quickstart, tests, benchmarks).

Every server is the stock ``python -m sglang.launch_server`` started through
``minedraft-sglang-cpu`` (``minedraft_sglang.cpu.server``, which
``launch/serve_cpu.sh`` runs too), so what is tested is what a user runs.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import requests

# The CPU server command, with this interpreter.
SERVE_CPU = (sys.executable, "-m", "minedraft_sglang.cpu.server")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# What uvicorn logs when the HTTP port was taken between free_port() and the
# server's bind (by another server's internal ports, say); the process then
# stays alive without serving (2026-12-06: a test waited out its 600 s).
PORT_TAKEN = "error while attempting to bind on address"


class PortTaken(RuntimeError):
    """The server could not bind its HTTP port; a new port may work."""


class Server:
    """A CPU server process with a log file; use as a context manager or
    call ``stop()``. ``command`` starts the server (default: this
    interpreter's ``minedraft_sglang.cpu.server``); ``env`` is added to
    ``base_env`` (default: this process's environment); ``cores``: the CPU
    set it runs on (default: this process's)."""

    def __init__(
        self,
        args: Sequence[str],
        log_path: Path,
        port: int | None = None,
        env=None,
        *,
        command: Sequence[str] = SERVE_CPU,
        base_env=None,
        cores: frozenset[int] | None = None,
    ):
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = Path(log_path)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        # float32 unless ``args`` say otherwise (the last --dtype wins): exact
        # comparisons with plain decoding need it.
        cmd = [*command, "--dtype", "float32", *args, "--port", str(self.port)]
        full_env = {**(os.environ if base_env is None else base_env), **(env or {})}
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(
            cmd,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=full_env,
            start_new_session=True,
            preexec_fn=None if cores is None else lambda: os.sched_setaffinity(0, cores),
        )

    def wait_ready(self, timeout: float = 600) -> Server:
        """Returns once the server answers /health_generate; raises (the
        server stopped) when it exits, cannot bind its port (``PortTaken``)
        or is not ready within ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}; log tail:\n{self.log_tail()}")
            tail = self.log_tail()
            if PORT_TAKEN in tail:
                self.stop()
                raise PortTaken(f"port {self.port} taken; log tail:\n{tail}")
            try:
                if requests.get(self.url + "/health_generate", timeout=30).status_code == 200:
                    return self
            except requests.RequestException:
                pass
            time.sleep(0.25)  # a pool of 30+ starts waits half a poll each
        tail = self.log_tail()
        self.stop()
        raise TimeoutError(f"server not ready in {timeout}s; log tail:\n{tail}")

    def log_tail(self, lines: int = 40) -> str:
        if not self._log.closed:
            self._log.flush()
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def generate(self, text, max_new_tokens: int, **extra) -> dict:
        payload = {
            "text": text,
            "sampling_params": {"max_new_tokens": max_new_tokens, "temperature": 0, **extra.pop("sampling", {})},
            **extra,
        }
        r = requests.post(self.url + "/generate", json=payload, timeout=600)
        r.raise_for_status()
        return r.json()

    def stop(self) -> None:
        """Kills the server's process group at once. SGLang's graceful
        shutdown (SIGTERM) took 5 s a server, in either of its paths (measured
        2026-12-06: draining requests, or a crash-diagnostics sleep when its
        children get the signal first), and once the main process outlived a
        30 s wait; nothing of these servers needs it (a trace record is
        appended and closed on its own)."""
        if self._log.closed:
            return  # stopped before: the group's id may be another's by now
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        self._log.close()

    def __enter__(self) -> Server:
        return self.wait_ready()

    def __exit__(self, *exc) -> None:
        self.stop()


def start_ready(args: Sequence[str], log_path: Path, *, env=None, timeout: float = 600, tries: int = 3) -> Server:
    """A ready ``Server(args, log_path, env=env)``, started again on a new
    port (up to ``tries`` times) when its port was taken before it bound."""
    for _ in range(tries - 1):
        try:
            return Server(args, log_path, env=env).wait_ready(timeout)
        except PortTaken:
            pass
    return Server(args, log_path, env=env).wait_ready(timeout)


def minedraft_args(model: str, draft: str, mode: str, num_steps: int = 3, extra: Sequence[str] = ()) -> list[str]:
    return [
        "--model-path",
        model,
        "--speculative-algorithm",
        "MINEDRAFT",
        "--speculative-draft-model-path",
        draft,
        "--speculative-num-steps",
        str(num_steps),
        "--minedraft-mode",
        mode,
        *extra,
    ]
