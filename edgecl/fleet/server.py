"""The ServerApp: edgecl's own round loop on Flower's low-level Grid API.

Flower's stock strategies average whole models with one weight per device; edgecl weighs each
array by the samples a device learned for it (`rounds.aggregate`), so the loop is ours. A round:
sample every connected node, ask each for its share (`train`), average what came back by the
round timeout, send the aggregate to every node that replied (`evaluate`) and collect their
acks. Message contents are described in `client`.

Settings are the run config (`app/pyproject.toml`, overridable with `flwr run --run-config`):
`num-rounds`, `min-nodes` (wait, at most `round-timeout` s, for that many nodes before a round,
`first-wait` s before the first; then go on with those there are), `round-timeout` (s, per
phase), `status-file` (JSON status
plus a `.prom` sibling; "" for none).
"""

from __future__ import annotations

import logging
import time

import numpy as np
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp

from edgecl.fleet.client import content_share, share_content
from edgecl.fleet.rounds import FleetStatus, RoundRecord, aggregate
from edgecl.fleet.wire import Share, WireError

app = ServerApp()

POLL_S = 0.5  # how often to ask the SuperLink for replies; its default loop sleeps 3 s


@app.main()
def main(grid: Grid, context: Context) -> None:
    rc = context.run_config
    num_rounds = int(rc.get("num-rounds", 3))
    min_nodes = int(rc.get("min-nodes", 2))
    timeout = float(rc.get("round-timeout", 60.0))
    first_wait = float(rc.get("first-wait", 300.0))
    status = FleetStatus(path=str(rc.get("status-file", "")) or None, num_rounds=num_rounds)
    status.write()
    try:
        for rnd in range(1, num_rounds + 1):
            wait = first_wait if rnd == 1 else timeout
            status.rounds.append(run_round(grid, rnd, min_nodes, wait, timeout, status))
            status.write()
            _log_round(status.rounds[-1])
    except Exception as e:
        status.error = f"{type(e).__name__}: {e}"
        status.write()
        raise
    status.finished = True
    status.write()


def run_round(grid: Grid, rnd: int, min_nodes: int, wait: float, timeout: float,
              status: FleetStatus) -> RoundRecord:
    """One round, start to end, once `min_nodes` are connected or `wait` s have passed; never
    raises for a node that fails, only for bad shares."""
    rec = RoundRecord(round=rnd, started=time.time())
    nodes = wait_for_nodes(grid, min_nodes, wait)
    status.nodes_connected = rec.nodes_connected = len(nodes)
    rec.sampled = [str(n) for n in nodes]
    if not nodes:
        rec.note = f"no node connected within {wait:g} s"
    else:
        agg = _collect_and_aggregate(grid, rnd, nodes, timeout, rec)
        if agg is not None:
            _distribute(grid, rnd, agg, [int(n) for n in rec.replied], timeout, rec)
    rec.duration_s = round(time.time() - rec.started, 3)
    return rec


def wait_for_nodes(grid: Grid, min_nodes: int, timeout: float) -> list[int]:
    """The connected nodes, once there are `min_nodes` or `timeout` s have passed."""
    deadline = time.monotonic() + timeout
    while True:
        nodes = sorted(grid.get_node_ids())
        if len(nodes) >= min_nodes or time.monotonic() >= deadline:
            return nodes
        time.sleep(1.0)


def _collect_and_aggregate(grid: Grid, rnd: int, nodes: list[int], timeout: float,
                           rec: RoundRecord) -> Share | None:
    msgs = [Message(RecordDict({"config": ConfigRecord({"round": rnd})}), dst_node_id=n,
                    message_type=MessageType.TRAIN, group_id=str(rnd), ttl=timeout)
            for n in nodes]
    replies = exchange(grid, msgs, timeout, rec)
    shares: list[Share] = []
    for node, reply in replies.items():
        try:
            share = content_share(reply.content)
        except (KeyError, WireError) as e:
            rec.errors[str(node)] = f"malformed share: {e}"
            continue
        if not all(np.isfinite(a).all() for a in share.arrays.values()):
            rec.errors[str(node)] = "its share holds NaN or infinite weights: left out"
            continue
        shares.append(share)
        rec.replied.append(str(node))
        rec.bytes_received[str(node)] = share.nbytes
    rec.replied.sort(key=rec.sampled.index)
    rec.failed = [s for s in rec.sampled if s not in rec.replied]
    if not shares:
        rec.note = "no node replied with a share"
        return None
    agg = aggregate(shares)
    rec.aggregate_bytes, rec.aggregate_arrays = agg.nbytes, len(agg.arrays)
    return agg


def _distribute(grid: Grid, rnd: int, agg: Share, nodes: list[int], timeout: float,
                rec: RoundRecord) -> None:
    content = share_content(agg)
    content["config"] = ConfigRecord({"round": rnd})
    msgs = [Message(content, dst_node_id=n, message_type=MessageType.EVALUATE,
                    group_id=str(rnd), ttl=timeout) for n in nodes]
    for node, reply in exchange(grid, msgs, timeout, rec).items():
        try:
            rec.acks[str(node)] = {"seq": int(reply.content["ack"]["seq"]),
                                   "sha256": str(reply.content["ack-info"]["sha256"])}
        except KeyError as e:
            rec.errors[str(node)] = f"malformed ack: missing {e}"
    rec.ack_failed = [str(n) for n in nodes if str(n) not in rec.acks]


def exchange(grid: Grid, msgs: list[Message], timeout: float,
             rec: RoundRecord) -> dict[int, Message]:
    """Send `msgs`; the good replies by destination node, those in by `timeout` s.

    Each message's TTL is the round timeout too, so a node that comes back late does not act on
    a round that is over (a stale aggregate, above all).

    Grid.send_and_receive would do, but it cannot say which node an error reply is for (those
    come from the SuperLink's own node id): the message ids pushed here can.
    """
    ids = list(grid.push_messages(msgs))
    pending = {mid: m.metadata.dst_node_id for mid, m in zip(ids, msgs, strict=True) if mid}
    for m, mid in zip(msgs, ids, strict=True):
        if not mid:
            rec.errors[str(m.metadata.dst_node_id)] = "the SuperLink refused the message"
    good: dict[int, Message] = {}
    deadline = time.monotonic() + timeout
    while pending and time.monotonic() < deadline:
        for reply in grid.pull_messages(list(pending)):
            node = pending.pop(reply.metadata.reply_to_message_id, None)
            if node is None:
                continue
            if reply.has_error():
                rec.errors[str(node)] = reply.error.reason
            else:
                good[node] = reply
        if pending:
            time.sleep(POLL_S)
    return good


def _log_round(r: RoundRecord) -> None:
    log(logging.INFO, "[edgecl fleet] round %d: %d/%d nodes replied, %d failed, %s in, "
        "aggregate %d arrays %s, %d/%d acked, %.1f s%s", r.round, len(r.replied),
        len(r.sampled), len(r.failed), _size(sum(r.bytes_received.values())),
        r.aggregate_arrays, _size(r.aggregate_bytes), len(r.acks), len(r.replied),
        r.duration_s, f" ({r.note})" if r.note else "")
    for node, why in r.errors.items():
        log(logging.WARNING, "[edgecl fleet] round %d: node %s: %s", r.round, node, why)


def _size(n: int) -> str:
    return f"{n} B" if n < 10 * 1024 else f"{n / 2**20:.2f} MiB"
