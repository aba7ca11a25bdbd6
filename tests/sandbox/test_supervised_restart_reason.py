"""The supervisor's restart log says why a service died: the last lines its run wrote (stderr shares the
log file), not an empty reason, and nothing from the run before."""

from __future__ import annotations

import asyncio
import logging
import sys

from propolis_sandbox.daemon import SupervisedProcess

DIES = ("import sys; print('starting', flush=True); "
        "sys.exit('ValidationError: field hubble_metrics: unknown metric \"dnss\"')")


async def test_restart_log_names_the_last_lines_of_the_run(tmp_path, caplog):
    log_path = tmp_path / "logs" / "svc.log"
    log_path.parent.mkdir()
    log_path.write_text("an earlier run said this\n")
    child = SupervisedProcess("svc", "cluster", "", [sys.executable, "-c", DIES], {}, log_path)
    child.start()
    task = asyncio.create_task(child.supervise())
    try:
        with caplog.at_level(logging.WARNING, logger="propolis_sandbox.daemon"):
            for _ in range(100):
                if child.restarts:
                    break
                await asyncio.sleep(0.05)
        assert child.restarts >= 1
        line = next(r.getMessage() for r in caplog.records if "exited with" in r.getMessage())
        assert 'svc on cluster exited with 1: starting | ValidationError: field hubble_metrics: unknown metric "dnss"' \
            in line, line
        assert "earlier run" not in line
    finally:
        child.stop()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
