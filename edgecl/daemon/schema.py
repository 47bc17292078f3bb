"""The sample schema `edgecl learn` accepts, and the validation every ingest source shares.

A sample is `{"task": "site-a", "x": [...], "y": 3}`: `x` holds the input's values, flat
(row-major) or nested to the input shape; `y` is a label index or a class name. Requests carry
one sample, `{"samples": [...]}`, NDJSON (one sample per line), or the binary form:

    {"task": "site-a", "y": [3, 1, ...], "dtype": "float32"}\\n<raw little-endian rows>

one JSON header line, then `len(y)` rows of the input's values as `float32`, or as `uint8`
multiplied by the header's `"scale"` (e.g. 1/255 for pixels sent as bytes).
A bad request raises `SampleError` naming the field and the problem; nothing of it is accepted.

A request may carry an id (`"request_id"` in a batch `{"samples": [...], "request_id": "..."}`
or in the binary header; over HTTP also the `Idempotency-Key` header): a request whose id the
journal holds already is answered with its first answer and journaled nothing, so a client may
send a request again after a lost connection without it being learned twice.

A sender whose messages travel in order (one MQTT publisher on its topic, one socket or HTTP
connection sending one request at a time) may number them: `"sender": "cam-1-3f9a"` (its name,
new for each run of the sender: the same rule as a request id) and `"sender_seq": 1, 2, ...`,
both in a batch or the binary header. The journal keeps each sender's last number: a number
not above it is a redelivery, answered `duplicate` and journaled nothing; a number beyond the
next counts the ones skipped as missing (a broker that dropped messages, or messages refused),
so nothing a broker loses goes unnoticed (see `Journal`).

An end of task travels the same way on every transport: `{"end_task": "site-a", "samples": 240}`
(HTTP also takes it as POST /v1/tasks/site-a/end with `{"samples": 240}`). `samples`, optional,
is how many samples of the task the sender had acknowledged before sending the end: the end is
journaled once that many have arrived, whatever transport carries them (see `Journal.append_end`).
"""

from __future__ import annotations

import dataclasses
import itertools
import re
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson

from edgecl.repository import TASK_ID, TASK_ID_RULE
from edgecl.setup import SampleSchema
from edgecl.web import json_may_hold_booleans

FLOAT32_MAX = float(np.finfo(np.float32).max)
JSON_TYPES = ("application/json", "application/x-ndjson", "application/jsonl")
BINARY_TYPE = "application/vnd.edgecl.samples"
BINARY_DTYPES = {"float32": "<f4", "uint8": "u1"}
REQUEST_ID = re.compile(r"[\x21-\x7e]{1,128}")
REQUEST_ID_RULE = "1 to 128 printable ASCII characters, no spaces"
BATCH_KEYS = {"samples", "request_id", "sender", "sender_seq"}


class SampleError(ValueError):
    """A request the schema refuses; `status` is the HTTP status that says so."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class EndTask:
    """The end of `task`, to apply after `samples` of its samples have arrived (None: after what
    has arrived when the end does)."""

    task: str
    samples: int | None = None


@dataclass(frozen=True)
class Sender:
    """The `seq`-th message (from 1) of the sender `name`."""

    name: str
    seq: int


@dataclass(frozen=True, eq=False)
class Samples:
    """Validated samples in request order: `x` float32 [n, *input_shape], `y` int64 [n]."""

    tasks: list[str]
    x: np.ndarray
    y: np.ndarray
    request_id: str | None = None  # the client's id of the request: journaled at most once
    sender: Sender | None = None  # who sent it, numbered in order: gaps and repeats are seen

    def __len__(self) -> int:
        return len(self.tasks)


def check_task(task: Any, where: str = "task") -> str:
    if not isinstance(task, str) or not TASK_ID.fullmatch(task):
        raise SampleError(f"{where}: {task!r} is not a task id ({TASK_ID_RULE})")
    return task


def parse_body(schema: SampleSchema, body: bytes, content_type: str,
               max_samples: int) -> Samples | EndTask:
    """Decode and validate a request body of any supported content type: samples, or an end
    of task."""
    kind = content_type.split(";")[0].strip().lower()
    if kind == BINARY_TYPE:
        return parse_binary(schema, body, max_samples)
    if kind and kind not in JSON_TYPES:
        raise SampleError(f"Content-Type {kind!r} not supported; use one of "
                          f"{', '.join((*JSON_TYPES, BINARY_TYPE))}", 415)
    records, envelope = json_records(body)
    if len(records) == 1 and isinstance(records[0], dict) and "end_task" in records[0]:
        return end_record(records[0])
    samples = parse_records(schema, records, max_samples, json_may_hold_booleans(body))
    return dataclasses.replace(samples, **envelope) if envelope else samples


def end_body(task: str, body: bytes) -> EndTask:
    """The body of POST /v1/tasks/{task}/end: none, or `{"samples": n}`."""
    return end_record(_json(body, "body") if body.strip() else {}, task)


def end_record(record: Any, task: str | None = None) -> EndTask:
    """`{"end_task": task, "samples": n}` (`samples` optional); with `task` given (the HTTP
    path names it), `{"samples": n}` or `{}`."""
    keys = {"samples"} if task is not None else {"end_task", "samples"}
    if (not isinstance(record, dict) or not set(record) <= keys
            or (task is None and "end_task" not in record)):
        form = '{"samples": n}' if task is not None else '{"end_task": task, "samples": n}'
        got = sorted(record) if isinstance(record, dict) else type(record).__name__
        raise SampleError(f"an end of task is {form}, samples optional; got {got}")
    samples = record.get("samples")
    if samples is not None and (type(samples) is not int or samples < 0):
        raise SampleError(f"samples: {samples!r} is not a count of samples (an integer >= 0)")
    return EndTask(check_task(record["end_task"] if task is None else task, "end_task"),
                   samples)


def check_request_id(request_id: Any, where: str = "request_id") -> str:
    if not isinstance(request_id, str) or not REQUEST_ID.fullmatch(request_id):
        raise SampleError(f"{where}: {request_id!r} is not a request id ({REQUEST_ID_RULE})")
    return request_id


def check_sender(doc: dict[str, Any], where: str) -> Sender | None:
    """`doc`'s `sender` and `sender_seq` (both or neither), checked."""
    name, seq = doc.get("sender"), doc.get("sender_seq")
    if name is None and seq is None:
        return None
    if name is None or seq is None:
        raise SampleError(f"{where}: sender and sender_seq go together; got only one")
    if not isinstance(name, str) or not REQUEST_ID.fullmatch(name):
        raise SampleError(f"{where}: sender {name!r} is not a sender name ({REQUEST_ID_RULE})")
    if type(seq) is not int or not 1 <= seq < 2**63:
        raise SampleError(f"{where}: sender_seq {seq!r} is not a message number (an integer "
                          ">= 1)")
    return Sender(name, seq)


def json_records(body: bytes) -> tuple[list[Any], dict[str, Any]]:
    """One sample, `{"samples": [...], "request_id"?, "sender"?, "sender_seq"?}`, or NDJSON
    lines: the records, not yet validated, and what the batch says of itself (`request_id`,
    `sender`: fields of `Samples`) when it does."""
    lines = [line for line in body.split(b"\n") if line.strip()]
    if not lines:
        raise SampleError("empty body: send a sample, {\"samples\": [...]} or NDJSON lines")
    docs = [_json(line, f"line {i + 1}" if len(lines) > 1 else "body")
            for i, line in enumerate(lines)]
    if len(docs) == 1 and isinstance(docs[0], dict) and "samples" in docs[0] \
            and "end_task" not in docs[0]:  # an end's "samples" is a count
        batch = docs[0]
        if not {"samples"} <= set(batch) <= BATCH_KEYS or not isinstance(batch["samples"], list):
            raise SampleError('a batch is {"samples": [sample, ...], "request_id"?, "sender"?, '
                              '"sender_seq"?} and nothing else')
        envelope: dict[str, Any] = {}
        if batch.get("request_id") is not None:
            envelope["request_id"] = check_request_id(batch["request_id"])
        if (sender := check_sender(batch, "batch")) is not None:
            envelope["sender"] = sender
        return batch["samples"], envelope
    return docs, {}


def _json(data: bytes, where: str) -> Any:
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError as e:
        raise SampleError(f"{where}: malformed JSON: {e}") from None


def parse_records(schema: SampleSchema, records: list[Any], max_samples: int,
                  check_each_value: bool = True) -> Samples:
    """Validate decoded JSON records against `schema`. `check_each_value=False` (when the body
    holds no booleans) lets numpy convert well-formed inputs at once; anything it cannot take
    exactly goes through the value-by-value check, which names the problem."""
    _check_count(len(records), max_samples)
    tasks, labels, inputs = [], [], []
    for i, record in enumerate(records):
        where = f"samples[{i}]" if len(records) > 1 else "sample"
        if not isinstance(record, dict) or set(record) != {"task", "x", "y"}:
            keys = sorted(record) if isinstance(record, dict) else type(record).__name__
            raise SampleError(f'{where}: must be {{"task", "x", "y"}} and nothing else, '
                              f"got {keys}")
        tasks.append(check_task(record["task"], f"{where}.task"))
        labels.append(label_index(schema, tasks[-1], record["y"], f"{where}.y"))
        inputs.append(_input(schema, record["x"], f"{where}.x", check_each_value))
    return Samples(tasks, _finite_float32(np.concatenate(inputs), schema),
                   np.array(labels, dtype=np.int64))


def _input(schema: SampleSchema, x: Any, where: str, check_each_value: bool) -> np.ndarray:
    """One input's values as a flat float64 array."""
    if not check_each_value and type(x) is list:
        try:
            values = np.asarray(x)
        except ValueError:  # ragged: the exact check says where
            values = None
        if (values is not None and values.dtype.kind in "iuf"
                and values.shape in ((schema.size,), schema.input_shape)):
            return values.reshape(-1).astype(np.float64, copy=False)
    try:
        return np.array(_numbers(schema, x, where), dtype=np.float64)
    except OverflowError:  # an integer too large for any float
        raise SampleError(f"{where}: a value lies beyond float32's range") from None


def _numbers(schema: SampleSchema, x: Any, where: str) -> list[float | int]:
    """The values of one input, flat or nested to the input shape, checked to be numbers."""
    size, shape = schema.size, schema.input_shape
    expected = f"{size} numbers, flat or nested as {list(shape)}"
    if type(x) is not list:
        raise SampleError(f"{where}: expected {expected}, got {type(x).__name__}")
    if len(x) == size and (size == 0 or type(x[0]) is not list):
        flat = x
    else:
        level = [x]
        for depth, n in enumerate(shape):
            if not all(type(v) is list and len(v) == n for v in level):
                raise SampleError(f"{where}: expected {expected}; nesting level {depth} is not "
                                  f"a list of {n}")
            level = list(itertools.chain.from_iterable(level))
        flat = level
    kinds = set(map(type, flat))
    if not kinds <= {float, int}:  # bool is not int here: true/false are not numbers
        bad = sorted(k.__name__ for k in kinds - {float, int})
        raise SampleError(f"{where}: values must be numbers, found {', '.join(bad)}")
    return flat


def _finite_float32(x: np.ndarray, schema: SampleSchema) -> np.ndarray:
    bad = ~(np.abs(x) <= FLOAT32_MAX)  # NaN compares false: caught here too
    if bad.any():
        row = int(np.flatnonzero(bad.reshape(-1, schema.size).any(axis=1))[0])
        raise SampleError(f"samples[{row}].x: holds NaN, Inf or a value beyond float32's range")
    return x.astype(np.float32).reshape(-1, *schema.input_shape)


def label_index(schema: SampleSchema, task: str, y: Any, where: str = "y") -> int:
    """A label index in range, or the index of one of `task`'s class names."""
    classes = schema.classes_of(task)
    if not classes:
        declared = ", ".join(sorted(schema.task_classes))
        raise SampleError(f"{where}: task {task!r} has no class list in the stream's schema "
                          f"(tasks with one: {declared})")
    if type(y) is int:
        if 0 <= y < len(classes):
            return y
        raise SampleError(f"{where}: label {y} is not in 0..{len(classes) - 1}")
    if isinstance(y, str):
        try:
            return classes.index(y)
        except ValueError:
            names = ", ".join(classes[:20]) + (", ..." if len(classes) > 20 else "")
            raise SampleError(f"{where}: {y!r} is not a class of task {task!r}; its classes: "
                              f"{names}") from None
    raise SampleError(f"{where}: must be a label index or a class name, got {y!r}")


def parse_binary(schema: SampleSchema, body: bytes, max_samples: int) -> Samples:
    """The binary form: a JSON header line, then the rows' raw bytes."""
    head, newline, raw = body.partition(b"\n")
    if not newline:
        raise SampleError("binary body: a JSON header line must end with a newline")
    header = _json(head, "binary header")
    allowed = {"task", "y", "dtype", "scale", "shape", "request_id", "sender", "sender_seq"}
    if not isinstance(header, dict) or not {"task", "y"} <= set(header) <= allowed:
        raise SampleError('binary header: must be {"task", "y", "dtype"?, "scale"?, "shape"?, '
                          '"request_id"?, "sender"?, "sender_seq"?}')
    request_id = header.get("request_id")
    if request_id is not None:
        check_request_id(request_id, "binary header: request_id")
    sender = check_sender(header, "binary header")
    task = check_task(header["task"])
    if not isinstance(header["y"], list):
        raise SampleError("binary header: y must be a list of labels, one per row")
    shape = header.get("shape", list(schema.input_shape))
    if shape != list(schema.input_shape):
        raise SampleError(f"binary header: rows shaped {shape!r}; this stream's samples are "
                          f"{list(schema.input_shape)}")
    n = len(header["y"])
    _check_count(n, max_samples)
    labels = [label_index(schema, task, y, f"y[{i}]") for i, y in enumerate(header["y"])]
    dtype = header.get("dtype", "float32")
    if not isinstance(dtype, str) or dtype not in BINARY_DTYPES:
        raise SampleError(f"binary header: dtype {dtype!r}; use float32 or uint8")
    scale = header.get("scale", 1.0)
    if type(scale) not in (int, float) or not 0 < scale <= FLOAT32_MAX:
        raise SampleError(f"binary header: scale must be a positive number, got {scale!r}")
    itemsize = np.dtype(BINARY_DTYPES[dtype]).itemsize
    if len(raw) != n * schema.size * itemsize:
        raise SampleError(f"binary body: {len(raw)} bytes after the header; {n} rows of "
                          f"{schema.size} {dtype} values need {n * schema.size * itemsize}")
    x = np.frombuffer(raw, dtype=BINARY_DTYPES[dtype]).astype(np.float32)
    if dtype == "uint8":
        x *= np.float32(scale)
    elif scale != 1.0:
        raise SampleError("binary header: scale applies to uint8 rows only")
    return Samples([task] * n, _finite_float32(x, schema), np.array(labels, dtype=np.int64),
                   request_id, sender)


def _check_count(n: int, max_samples: int) -> None:
    if n == 0:
        raise SampleError("no samples in the request")
    if n > max_samples:
        raise SampleError(f"{n:,} samples in one request; the limit is {max_samples:,}", 413)
