"""Log lines for services: one JSON object per line on stderr, what journald and log shippers
parse."""

from __future__ import annotations

import json
import logging
from datetime import datetime, timezone


class JsonLines(logging.Formatter):
    """`{"ts", "level", "logger", "msg"}` (and `"exc"` with a traceback) per record."""

    def format(self, record: logging.LogRecord) -> str:
        ts = datetime.fromtimestamp(record.created, timezone.utc)
        line = {"ts": ts.isoformat(timespec="milliseconds"), "level": record.levelname.lower(),
                "logger": record.name, "msg": record.getMessage()}
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        return json.dumps(line)


def log_json_lines() -> None:
    """JSON lines on stderr for every logger: edgecl's own say INFO; libraries (the ONNX
    exporter's passes...) only warnings."""
    handler = logging.StreamHandler()
    handler.setFormatter(JsonLines())
    logging.basicConfig(level=logging.WARNING, handlers=[handler], force=True)
    logging.getLogger("edgecl").setLevel(logging.INFO)
