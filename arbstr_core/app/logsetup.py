"""arbstr's log lines: one stderr handler, every record scrubbed of every configured secret (SPEC §1.1)."""

from __future__ import annotations

import logging

from ..config import Config
from ..secrets import Scrubber


class _ScrubFilter(logging.Filter):
    """Last line of defence: no log record leaves with a configured secret in it."""

    def __init__(self, scrub: Scrubber) -> None:
        super().__init__()
        self.scrub = scrub

    def filter(self, record: logging.LogRecord) -> bool:
        clean = self.scrub(record.getMessage())
        if record.exc_info:
            clean += "\n" + self.scrub(logging.Formatter().formatException(record.exc_info))
            record.exc_info = None
            record.exc_text = None
        record.msg, record.args = clean, None  # formatted once: the handler's Formatter reuses it
        return True


def setup_logging(config: Config, scrub: Scrubber) -> None:
    logger = logging.getLogger("arbstr")
    logger.setLevel(config.logging.level.upper())
    logger.propagate = False
    handler = next((h for h in logger.handlers if getattr(h, "arbstr", False)), None)
    if handler is None:
        handler = logging.StreamHandler()
        handler.arbstr = True  # type: ignore[attr-defined]
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        logger.addHandler(handler)
    handler.filters = [_ScrubFilter(scrub)]
    # gunicorn's own loggers in this worker: its debug log names request paths, its access log request
    # lines, and a client may put a key in either (/v1/requests/<key>, ?model=<key>).
    for name in ("gunicorn.error", "gunicorn.access"):
        other = logging.getLogger(name)
        other.filters = [f for f in other.filters if not isinstance(f, _ScrubFilter)] + [_ScrubFilter(scrub)]
