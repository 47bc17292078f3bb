#!/usr/bin/env python3
"""The containers' HEALTHCHECK: exit 0 when the daemon says it is ready, 1 otherwise.

Default: edgecl learn's GET /readyz on port 8765, with $EDGECL_LEARN_TOKEN if set (every path
but /healthz needs it). For edgecl serve set EDGECL_HEALTH_URL to its
http://127.0.0.1:8080/v2/health/ready (open, no token). Standard library only.
"""

import os
import sys
import urllib.request

url = os.environ.get("EDGECL_HEALTH_URL", "http://127.0.0.1:8765/readyz")
token = os.environ.get("EDGECL_LEARN_TOKEN") if url.endswith("/readyz") else None
headers = {"Authorization": f"Bearer {token}"} if token else {}
try:
    with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=4) as r:
        sys.exit(0 if r.status == 200 else 1)
except OSError as e:  # URLError and HTTPError (503: not ready yet) are OSErrors
    print(f"{url}: {e}", file=sys.stderr)
    sys.exit(1)
