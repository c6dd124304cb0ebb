"""structlog, configured once at start: JSON when stderr is not a TTY, console otherwise."""

import logging
import sys

import structlog

# Whether each RPC writes its canonical "rpc" line (api/status.py): only at debug, so
# that a warm call at info costs no structlog work at all. True until `configure`
# runs, so code under test (structlog's capture, no level) still sees every line.
per_call_lines = True

_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}


def configure(level: str = "info", fmt: str = "auto") -> None:
    global per_call_lines
    per_call_lines = _LEVELS[level] <= logging.DEBUG
    use_json = fmt == "json" or (fmt == "auto" and not sys.stderr.isatty())
    renderer: structlog.typing.Processor = (
        structlog.processors.JSONRenderer()
        if use_json
        else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[level]),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )
