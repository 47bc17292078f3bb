"""Filters of the edgecl playbooks: the health gate's probe request and the morning status table.

Plain functions of plain data (what the uri module returned), so they are tested without Ansible.
"""

from __future__ import annotations

import math
import re
import time
from typing import Any

DOWN = "down"


def edgecl_probe_request(metadata: dict[str, Any], value: float = 0.5) -> dict[str, Any]:
    """A KServe v2 infer request of one sample shaped as `metadata` (GET /v2/models/{task})
    says: its first input's name and shape with the batch axis set to 1, every value `value`."""
    (spec,) = metadata["inputs"]
    shape = [1, *spec["shape"][1:]]
    if any(not isinstance(d, int) or d < 1 for d in shape[1:]):
        raise ValueError(f"model {metadata.get('name')!r}: input shape {spec['shape']} has a "
                         "dynamic axis besides the batch")
    return {"inputs": [{"name": spec["name"], "shape": shape, "datatype": spec["datatype"],
                        "data": [float(value)] * math.prod(shape)}]}


def edgecl_probe_answer_ok(answer: dict[str, Any], metadata: dict[str, Any]) -> bool:
    """Whether an infer answer to `edgecl_probe_request(metadata)` holds one row of finite
    logits of the model's output width."""
    try:
        (output,) = answer["outputs"]
        width = metadata["outputs"][0]["shape"][1]
        data = output["data"]
        return (output["shape"] == [1, width] and len(data) == width
                and all(isinstance(v, int | float) and math.isfinite(v) for v in data))
    except (KeyError, IndexError, TypeError, ValueError):
        return False


def edgecl_models_by_task(results: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """{task: model metadata} of the uri results of GET /v2/models/{task} that answered 200
    (`item` is the task)."""
    return {r["item"]: r["json"] for r in results
            if not r.get("skipped") and r.get("status") == 200 and isinstance(r.get("json"), dict)}


# --- the status table ---------------------------------------------------------------------------


def _num(v: Any) -> str:
    return f"{v:,}" if isinstance(v, int) else "-"


def _acc(v: Any) -> str:
    return f"{v:.3f}" if isinstance(v, int | float) else "-"


def _age(seconds: float) -> str:
    seconds = max(0, int(seconds))
    if seconds < 120:
        return f"{seconds}s ago"
    if seconds < 7200:
        return f"{seconds // 60}m ago"
    if seconds < 2 * 86400:
        return f"{seconds // 3600}h ago"
    return f"{seconds // 86400}d ago"


def _table(header: list[str], rows: list[list[str]], right: set[int]) -> list[str]:
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows, strict=True)]

    def line(cells: list[str]) -> str:
        out = [c.rjust(w) if i in right else c.ljust(w)
               for i, (c, w) in enumerate(zip(cells, widths, strict=True))]
        return "  ".join(out).rstrip()

    return [line(header), line(["-" * w for w in widths]), *(line(r) for r in rows)]


def edgecl_status_rows(reports: list[dict[str, Any]], now: float | None = None
                       ) -> dict[str, Any]:
    """Devices and tasks of the reports gathered by status.yml, as rows of plain values.

    A report: host, device, release, learn (GET /v1/status or None), learn_error, serve (GET /v2
    or None), serve_error, models ({task: GET /v2/models/{task}}), unreachable.
    """
    now = time.time() if now is None else now
    devices, tasks, alerts = [], [], []
    for r in sorted(reports, key=lambda r: r.get("device") or r["host"]):
        name = r.get("device") or r["host"]
        if r.get("unreachable"):
            devices.append({"device": name, "host": r["host"], "state": "unreachable"})
            alerts.append(f"{name}: unreachable")
            continue
        learn, serve, models = r.get("learn"), r.get("serve"), r.get("models") or {}
        checkpoint = (learn or {}).get("last_checkpoint") or {}
        device = {
            "device": name, "host": r["host"], "state": "ok", "release": r.get("release") or "",
            "serve_version": (serve or {}).get("version"),
            "ready": learn.get("ready") if learn else None,
            "method": learn.get("method") if learn else None,
            "accepted": learn.get("accepted") if learn else None,
            "learned": learn.get("learned") if learn else None,
            "rejected": learn.get("rejected") if learn else None,
            "lag": learn["journal"]["lag"] if learn else None,
            "checkpoint": checkpoint.get("file"), "checkpoint_offset": checkpoint.get("offset"),
            "checkpoint_age_s": (now - checkpoint["at"]) if checkpoint.get("at") else None,
            "tasks_known": len(learn["tasks"]) if learn else None,
            "models_served": len(models) if serve else None,
        }
        devices.append(device)
        if not learn:
            device["state"] = "degraded"
            alerts.append(f"{name}: edgecl learn {DOWN} ({r.get('learn_error') or 'no answer'})")
        elif not learn.get("ready"):
            alerts.append(f"{name}: edgecl learn not ready (replaying its journal?)")
        if not serve:
            device["state"] = "degraded"
            alerts.append(f"{name}: edgecl serve {DOWN} ({r.get('serve_error') or 'no answer'})")
        known = dict((learn or {}).get("tasks") or {})
        for task in sorted({*known, *models}):
            t = known.get(task) or {}
            then, acc = t.get("accuracy_when_learned"), t.get("accuracy")
            meta = models.get(task)
            served = meta["versions"][-1] if meta and meta.get("versions") else None
            tasks.append({
                "device": name, "task": task, "accepted": t.get("accepted"),
                "held_out": t.get("held_out"), "accuracy_when_learned": then, "accuracy": acc,
                "forgetting": then - acc if then is not None and acc is not None else None,
                "published_version": t.get("served_version"), "served_version": served,
                "open": task == (learn or {}).get("open_task")})
    return {"devices": devices, "tasks": tasks, "alerts": alerts}


def edgecl_status_table(reports: list[dict[str, Any]], now: float | None = None) -> str:
    """The morning table: one line per device, one per (device, task), then what needs a look."""
    rows = edgecl_status_rows(reports, now)
    device_rows = []
    for d in rows["devices"]:
        if d["state"] == "unreachable":
            device_rows.append([d["device"], d["host"], "UNREACHABLE", *["-"] * 8])
            continue
        checkpoint = "-"
        if d["checkpoint"]:
            age = _age(d["checkpoint_age_s"]) if d["checkpoint_age_s"] is not None else "?"
            short = re.sub(r"([0-9a-f]{8})[0-9a-f]{16,}", r"\1~", d["checkpoint"])
            checkpoint = f"{short} @{d['checkpoint_offset']:,} ({age})"
        ready = DOWN if d["ready"] is None else "yes" if d["ready"] else "no"
        served = DOWN if d["models_served"] is None else str(d["models_served"])
        device_rows.append([
            d["device"], d["host"], d["release"] or "-", ready, d["method"] or "-",
            _num(d["accepted"]), _num(d["learned"]), _num(d["lag"]), checkpoint,
            _num(d["tasks_known"]), served])
    task_rows = [[
        t["device"], t["task"] + (" (open)" if t["open"] else ""), _num(t["accepted"]),
        _num(t["held_out"]), _acc(t["accuracy_when_learned"]), _acc(t["accuracy"]),
        _acc(t["forgetting"]), str(t["published_version"] or "-"),
        str(t["served_version"] or "-")] for t in rows["tasks"]]
    lines = _table(["device", "host", "release", "ready", "method", "accepted", "learned", "lag",
                    "last checkpoint", "tasks", "served"], device_rows, {5, 6, 7, 9, 10})
    lines += ["", *_table(["device", "task", "accepted", "held out", "acc. learned", "acc. now",
                           "forgetting", "published", "served"], task_rows,
                          {2, 3, 4, 5, 6, 7, 8})]
    alerts = [f"! {a}" for a in rows["alerts"]] or ["every device answers"]
    return "\n".join([*lines, "", *alerts])


class FilterModule:
    def filters(self) -> dict[str, Any]:
        return {f.__name__: f for f in (edgecl_probe_request, edgecl_probe_answer_ok,
                                        edgecl_models_by_task, edgecl_status_rows,
                                        edgecl_status_table)}
