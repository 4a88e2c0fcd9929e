"""The test and bench launcher (lab/launcher.py): a server whose HTTP port was taken before it bound."""

from __future__ import annotations

import sys
import time

import pytest

from minedraft_sglang.lab import launcher

# A stand-in process that logs what uvicorn logs when its port is taken, then stays alive without serving, as
# SGLang's server did (2026-12-06). The launcher appends its own arguments; `python -c` ignores them.
TAKEN = (
    sys.executable,
    "-c",
    f"print('ERROR:    [Errno 98] {launcher.PORT_TAKEN} (x)', flush=True); __import__('time').sleep(60)",
)


def test_a_taken_port_is_reported_at_once_with_the_log_and_the_process_stopped(tmp_path):
    server = launcher.Server([], tmp_path / "s.log", command=TAKEN)
    t0 = time.monotonic()
    with pytest.raises(launcher.PortTaken, match="Errno 98"):
        server.wait_ready(timeout=30)
    assert time.monotonic() - t0 < 10
    assert server.proc.poll() is not None


def test_start_ready_tries_new_ports(tmp_path, monkeypatch):
    ports = []
    real = launcher.Server.__init__

    def init(self, args, log_path, port=None, env=None, **kw):
        real(self, args, log_path, port, env, command=TAKEN)
        ports.append(self.port)

    monkeypatch.setattr(launcher.Server, "__init__", init)
    with pytest.raises(launcher.PortTaken):
        launcher.start_ready([], tmp_path / "s.log", timeout=30, tries=2)
    assert len(ports) == 2
