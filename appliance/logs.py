"""structlog, configured once per process at start: JSON lines on stdout, console on a TTY.

Every line carries `ts`, `level`, `event` and `process`. Standard-library loggers (granian,
psycopg, pgqueuer, botocore) are routed through the same processors, so supervisord's merged
stdout stays one JSON object per line. URL passwords are masked in every string value.
"""

from __future__ import annotations

import logging
import logging.config
import sys
from typing import Any, Literal, TextIO

import structlog

from appliance.config import scrub

ProcessName = Literal["api", "worker", "flusher", "scheduler", "cli"]


def _scrub_values(_: Any, __: str, event: structlog.types.EventDict) -> structlog.types.EventDict:
    for key, value in event.items():
        if isinstance(value, str) and ("://" in value or "password=" in value.lower()):
            event[key] = scrub(value)
    return event


def _processors(process: str) -> list[structlog.types.Processor]:
    def add_process(_: Any, __: str, event: structlog.types.EventDict) -> structlog.types.EventDict:
        event.setdefault("process", process)
        return event

    return [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True, key="ts"),
        add_process,
        structlog.processors.format_exc_info,
        _scrub_values,
    ]


def _renderer(fmt: str, stream: TextIO = sys.stdout) -> structlog.types.Processor:
    console = fmt == "console" or (fmt == "auto" and stream.isatty())
    if console:
        return structlog.dev.ConsoleRenderer()
    return structlog.processors.JSONRenderer()


def stdlib_config(
    process: str, level: str = "info", fmt: str = "auto", stream: str = "ext://sys.stdout"
) -> dict[str, Any]:
    """A logging.dictConfig routing stdlib records through structlog (also given to granian)."""
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {
            "structlog": {
                "()": "appliance.logs.formatter",
                "process": process,
                "fmt": fmt,
            }
        },
        "handlers": {
            "stdout": {
                "class": "logging.StreamHandler",
                "stream": stream,
                "formatter": "structlog",
            }
        },
        "root": {"handlers": ["stdout"], "level": level.upper()},
        "loggers": {
            # botocore logs request details at INFO on some paths; keep it at warnings.
            "botocore": {"level": "WARNING"},
            "_granian": {"level": level.upper()},
            "granian.access": {"level": "WARNING"},
        },
    }


def formatter(process: str, fmt: str = "auto") -> structlog.stdlib.ProcessorFormatter:
    return structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=_processors(process),
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, _renderer(fmt)],
    )


def configure(
    process: ProcessName, level: str = "info", fmt: str = "auto", *, to_stderr: bool = False
) -> None:
    """Programs log to stdout (supervisord collects it); CLI commands to stderr."""
    stream = sys.stderr if to_stderr else sys.stdout
    logging.config.dictConfig(
        stdlib_config(process, level, fmt, "ext://sys.stderr" if to_stderr else "ext://sys.stdout")
    )
    structlog.configure(
        processors=[
            *_processors(process),
            structlog.processors.StackInfoRenderer(),
            _renderer(fmt, stream),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level.upper())),
        # WriteLogger writes line and newline in one call (print() makes two), so lines of
        # different programs cannot interleave in supervisord's merged stdout.
        logger_factory=structlog.WriteLoggerFactory(stream),
        cache_logger_on_first_use=True,
    )
