"""supervisord event listener: on PROCESS_STATE_FATAL, record it and shut supervisord down.

supervisord itself exits 0 after `supervisor.shutdown`, so the marker file is how start.sh knows
to exit 1 (and `--restart=on-failure` restarts the container). Run as `python -m
appliance.supervisor_listener <marker-path>`; it speaks supervisor's listener protocol on
stdin/stdout, so it never logs to stdout.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from supervisor import childutils


def main() -> None:
    marker = Path(sys.argv[1])
    while True:
        headers, payload = childutils.listener.wait(sys.stdin, sys.stdout)
        if headers["eventname"] == "PROCESS_STATE_FATAL":
            fields = dict(token.split(":", 1) for token in payload.split())
            name = fields.get("processname", "?")
            marker.write_text(f"{name}\n")
            sys.stderr.write(
                f'{{"event": "program_fatal", "level": "error", "program": "{name}", '
                f'"process": "supervisor"}}\n'
            )
            sys.stderr.flush()
            childutils.getRPCInterface(os.environ).supervisor.shutdown()
        childutils.listener.ok(sys.stdout)


if __name__ == "__main__":
    main()
