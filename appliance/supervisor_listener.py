"""supervisord event listener: on PROCESS_STATE_FATAL, record it and shut supervisord down.

supervisord itself exits 0 after `supervisor.shutdown`, so the marker file is how start.sh knows
to exit 1 (and `--restart=on-failure` restarts the container). A FATAL that supervisord reports
while it is already shutting down (a program in back-off during a requested stop) is not a
failure and is ignored. Run as `python -m appliance.supervisor_listener <marker-path>`; it speaks
supervisor's listener protocol on stdin/stdout, so it logs (JSON) to stderr only.
"""

from __future__ import annotations

import json
import os
import sys
import xmlrpc.client
from pathlib import Path

from supervisor import childutils

RUNNING = 1  # supervisord's own state code for "running" (getState()["statecode"])


def log(event: str, **fields: str) -> None:
    sys.stderr.write(
        json.dumps({"event": event, "level": "error", "process": "supervisor", **fields}) + "\n"
    )
    sys.stderr.flush()


def on_fatal(marker: Path, program: str) -> None:
    rpc = childutils.getRPCInterface(os.environ).supervisor
    try:
        if rpc.getState()["statecode"] != RUNNING:
            return
        marker.write_text(f"{program}\n")
        log("program_fatal", program=program)
        rpc.shutdown()
    except xmlrpc.client.Fault as fault:
        # SHUTDOWN_STATE: supervisord began stopping between our two calls; nothing to do.
        log("fatal_listener_fault", program=program, fault=fault.faultString)


def main() -> None:
    marker = Path(sys.argv[1])
    while True:
        headers, payload = childutils.listener.wait(sys.stdin, sys.stdout)
        if headers["eventname"] == "PROCESS_STATE_FATAL":
            fields = dict(token.split(":", 1) for token in payload.split())
            on_fatal(marker, fields.get("processname", "?"))
        childutils.listener.ok(sys.stdout)


if __name__ == "__main__":
    main()
