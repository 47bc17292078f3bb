"""The ClientApp a device's SuperNode runs: a thin bridge to the device's own `edgecl learn`.

The SuperNode starts a short-lived `flwr-clientapp` process per message, so nothing here holds a
model: the daemon does. Its URL comes from the SuperNode's node config (`daemon-url`, which the
daemon sets when it starts its SuperNode), and its token from `EDGECL_LEARN_TOKEN`, which
reaches this process because the daemon starts the SuperNode with its own environment and the
SuperNode's SuperExec passes it on.

Messages (the server's side is `server`):
- `train`: content none needed. Reply: `arrays` (ArrayRecord keyed by the share's array names)
  and `weights` (MetricRecord, the same keys, the share's per-array weights as floats).
- `evaluate`: content `arrays` + `weights` (the round's aggregate, as above) and `config`
  (ConfigRecord with `round`). Reply: `ack` (MetricRecord `seq`, `bytes`) and `ack-info`
  (ConfigRecord `sha256`), what the daemon answered once it journaled the aggregate.
Flower calls its second message type `evaluate`; here it means "apply the round's aggregate".

A daemon error is raised, never turned into an empty reply: Flower then reports the node as
failed for that round, with the daemon's own words as the reason.
"""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from edgecl.fleet import wire

app = ClientApp()

HTTP_TIMEOUT_S = 120.0  # a daemon busy checkpointing may take a while to answer


class DaemonError(RuntimeError):
    """The device's edgecl daemon could not be reached, or answered with an error."""


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Hand the server this device's current share."""
    body = _call(context, "GET", "/v1/fleet/share")
    share = wire.unpack(body)
    return Message(share_content(share), reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Give the round's aggregate to the daemon; reply once it is durably journaled there."""
    share = content_share(msg.content)
    rnd = int(msg.content["config"]["round"])
    data = wire.pack(share)
    answer = json.loads(_call(context, "POST", f"/v1/fleet/aggregate?round={rnd}", data))
    ack = MetricRecord({"seq": int(answer["seq"]), "bytes": len(data)})
    info = ConfigRecord({"sha256": str(answer.get("sha256", ""))})
    return Message(RecordDict({"ack": ack, "ack-info": info}), reply_to=msg)


def share_content(share: wire.Share) -> RecordDict:
    """A share as message content: `arrays` and `weights` keyed by array name."""
    arrays = ArrayRecord({n: Array(np.ascontiguousarray(a)) for n, a in share.arrays.items()})
    weights = MetricRecord({n: float(w) for n, w in share.weights.items()})
    return RecordDict({"arrays": arrays, "weights": weights})


def content_share(content: RecordDict) -> wire.Share:
    """The share `share_content` packed (wire.WireError if the two records disagree)."""
    arrays = {n: a.numpy().astype(np.float32, copy=False)
              for n, a in content["arrays"].items()}
    weights = {n: float(w) for n, w in content["weights"].items()}
    return wire.Share(arrays, weights)


def _call(context: Context, method: str, path: str, body: bytes | None = None) -> bytes:
    base = str(context.node_config.get("daemon-url", "")).rstrip("/")
    if not base:
        raise DaemonError("this SuperNode has no daemon-url in its node config; start it with "
                          "--node-config 'daemon-url=\"http://127.0.0.1:PORT\"' (edgecl learn "
                          "does so itself)")
    url = base + path
    req = urllib.request.Request(url, data=body, method=method, headers=_headers(body))
    try:
        with urllib.request.urlopen(req, timeout=HTTP_TIMEOUT_S) as r:
            return r.read()
    except urllib.error.HTTPError as e:
        raise DaemonError(f"edgecl daemon answered {method} {path} with {e.code}: "
                          f"{_reason(e)}") from None
    except (urllib.error.URLError, OSError) as e:
        raise DaemonError(f"cannot reach the edgecl daemon at {base} ({method} {path}): "
                          f"{getattr(e, 'reason', e)}") from None


def _headers(body: bytes | None) -> dict[str, str]:
    headers = {"Accept": f"{wire.MEDIA_TYPE}, application/json"}
    if body is not None:
        headers["Content-Type"] = wire.MEDIA_TYPE
    token = os.environ.get("EDGECL_LEARN_TOKEN")
    if token:
        headers["Authorization"] = f"Bearer {token}"
    return headers


def _reason(e: urllib.error.HTTPError) -> str:
    """The daemon's `{"error": ...}` text, or the start of whatever else it sent."""
    raw = e.read()[:2000]
    try:
        return str(json.loads(raw)["error"])
    except (ValueError, KeyError, TypeError):
        return raw.decode("utf-8", "replace").strip() or str(e.reason)
