"""Sample validation: what `edgecl learn` accepts, and the one-line reason for what it refuses."""

import numpy as np
import orjson
import pytest
from learn_helpers import CLASSES, SHAPE, stream_config

from edgecl import setup
from edgecl.config import ConfigError
from edgecl.daemon.schema import BINARY_TYPE, SampleError, Sender, parse_body
from edgecl.setup import build_config, stream_schema

SCHEMA = stream_schema(stream_config())


def parse(obj, content_type="application/json", max_samples=100):
    body = obj if isinstance(obj, bytes) else orjson.dumps(obj)
    return parse_body(SCHEMA, body, content_type, max_samples)


def refused(obj, content_type="application/json", max_samples=100) -> SampleError:
    with pytest.raises(SampleError) as e:
        parse(obj, content_type, max_samples)
    return e.value


def test_one_sample_flat_or_nested_index_or_class_name():
    flat = parse({"task": "site-a", "x": [1, 2, 3, 4, 5, 6.5], "y": 2})
    nested = parse({"task": "site-a", "x": [[1, 2, 3], [4, 5, 6.5]], "y": "sit"})
    for s in (flat, nested):
        assert s.tasks == ["site-a"]
        assert s.x.dtype == np.float32 and s.x.shape == (1, *SHAPE)
        assert s.x[0, 1, 2] == 6.5 and s.y.tolist() == [2]


def test_a_batch_and_ndjson_keep_request_order():
    samples = [{"task": f"t{i % 2}", "x": [i] * 6, "y": i % 3} for i in range(5)]
    batch = parse({"samples": samples})
    ndjson = parse(b"\n".join(orjson.dumps(s) for s in samples) + b"\n", "application/x-ndjson")
    for s in (batch, ndjson):
        assert s.tasks == ["t0", "t1", "t0", "t1", "t0"]
        assert s.x[:, 0, 0].tolist() == [0, 1, 2, 3, 4] and s.y.tolist() == [0, 1, 2, 0, 1]


@pytest.mark.parametrize(("sample", "words"), [
    ({"task": "a", "x": [1] * 5, "y": 0}, ["sample.x", "6 numbers"]),
    ({"task": "a", "x": [[1, 2], [3, 4], [5, 6]], "y": 0}, ["sample.x", "nesting"]),
    ({"task": "a", "x": [True, 0.5, 1, 1, 1, 1], "y": 0}, ["sample.x", "bool"]),
    ({"task": "a", "x": ["1", 0.5, 1, 1, 1, 1], "y": 0}, ["sample.x", "str"]),
    ({"task": "a", "x": [None, 0.5, 1, 1, 1, 1], "y": 0}, ["sample.x", "NoneType"]),
    ({"task": "a", "x": [1e39, 0, 0, 0, 0, 0], "y": 0}, ["x", "float32"]),
    (b'{"task": "a", "x": [1' + b"0" * 60 + b', 0, 0, 0, 0, 0], "y": 0}', ["x", "float32"]),
    ({"task": "a", "x": [0] * 6, "y": 3}, ["sample.y", "0..2"]),
    ({"task": "a", "x": [0] * 6, "y": -1}, ["sample.y", "0..2"]),
    ({"task": "a", "x": [0] * 6, "y": True}, ["sample.y", "label index"]),
    ({"task": "a", "x": [0] * 6, "y": "swim"},
     ["sample.y", "'swim' is not a class of task 'a'", "walk, run, sit"]),
    ({"task": "../etc", "x": [0] * 6, "y": 0}, ["sample.task", "task id"]),
    ({"task": "a", "x": [0] * 6, "y": 0, "ts": 1}, ["sample", "nothing else"]),
    ({"samples": [{"task": "a", "x": [0] * 6, "y": 0}, {"task": "a", "x": [0] * 6, "y": 9}]},
     ["samples[1].y"]),
    ({"samples": []}, ["no samples"]),
    ([1, 2], ["sample", "nothing else"]),
])
def test_bad_samples_name_the_field_and_the_problem(sample, words):
    e = refused(sample)
    assert e.status == 400
    for word in words:
        assert word in str(e)


def test_nan_and_malformed_json_and_limits():
    assert "malformed JSON" in str(refused(b'{"task": "a", "x": [NaN], "y": 0}'))
    assert "infinity" in str(refused(b'{"task": "a", "x": [1e400, 0, 0, 0, 0, 0], "y": 0}'))
    assert "empty body" in str(refused(b"  \n"))
    too_many = {"samples": [{"task": "a", "x": [0] * 6, "y": 0}] * 3}
    assert refused(too_many, max_samples=2).status == 413
    assert refused({"task": "a"}, "text/csv").status == 415


def binary(task="a", y=(0, 1), rows=None, dtype="float32", **extra):
    rows = np.arange(len(y) * 6, dtype=np.float32) if rows is None else rows
    header = orjson.dumps({"task": task, "y": list(y), "dtype": dtype, **extra})
    return header + b"\n" + rows.astype("<f4" if dtype == "float32" else "u1").tobytes()


def test_binary_form_float32_and_scaled_uint8():
    s = parse(binary(y=(0, "run")), BINARY_TYPE)
    assert s.x.shape == (2, *SHAPE) and s.x[1, 1, 2] == 11 and s.y.tolist() == [0, 1]
    u = parse(binary(rows=np.full(6, 255), y=(2,), dtype="uint8", scale=1 / 255), BINARY_TYPE)
    assert u.x.dtype == np.float32 and np.allclose(u.x, 1.0)


def test_binary_form_refusals():
    assert "need 48" in str(refused(binary(rows=np.zeros(11)), BINARY_TYPE))
    assert "dtype" in str(refused(binary(dtype="float64"), BINARY_TYPE))
    nan = np.zeros(12, dtype=np.float32)
    nan[7] = np.nan
    assert "samples[1].x" in str(refused(binary(rows=nan), BINARY_TYPE))
    assert "newline" in str(refused(b'{"task": "a", "y": [0]}', BINARY_TYPE))
    assert "y[1]" in str(refused(binary(y=(0, 7)), BINARY_TYPE))


def test_schema_comes_from_the_benchmark_when_the_stream_section_is_absent():
    schema = stream_schema(build_config({"benchmark": {"name": "pmnist", "n_tasks": 3}}))
    assert schema.input_shape == (1, 28, 28) and schema.classes == tuple("0123456789")
    assert schema.head == "shared" and schema.max_tasks == 3 and schema.batch_size == 10
    with pytest.raises(ConfigError, match="distinct"):
        stream_schema(build_config({"stream": {"input_shape": [2], "classes": ["a", "a"],
                                            "head": "shared", "max_tasks": 2}}))
    assert list(SCHEMA.classes) == CLASSES


def test_the_stream_takes_the_configs_head_as_bench_does():
    stream = {"input_shape": list(SHAPE), "classes": CLASSES, "max_tasks": 2}
    assert stream_schema(build_config({"head": "per_task", "stream": stream})).head == "per_task"
    both = {"head": "per_task", "stream": {**stream, "head": "shared"}}
    assert stream_schema(build_config(both)).head == "shared"  # the stream section wins


def test_a_stream_alone_is_the_schema_and_loads_no_benchmark(monkeypatch):
    def no_data(cfg):
        raise AssertionError("a stream with input_shape and classes needs no benchmark")

    monkeypatch.setattr(setup, "benchmark_for", no_data)
    schema = stream_schema(build_config({"stream": {"input_shape": [6, 64],
                                                    "classes": ["walk", "run"]}}))
    assert (schema.input_shape, schema.classes) == ((6, 64), ("walk", "run"))
    assert schema.head == "shared" and schema.max_tasks == setup.DEFAULT_MAX_TASKS
    assert schema.batch_size == 10


def test_a_class_list_per_task_is_a_head_per_task_and_checked_per_task():
    schema = stream_schema(build_config({"stream": {
        "input_shape": list(SHAPE), "classes": {"kitchen": ["cut", "stir"],
                                                "garden": ["dig", "rake", "sow"]}}}))
    assert schema.head == "per_task" and schema.max_tasks == 2 and schema.n_classes == 3
    body = orjson.dumps({"samples": [{"task": "garden", "x": [0] * 6, "y": "sow"},
                                     {"task": "kitchen", "x": [0] * 6, "y": "stir"}]})
    assert parse_body(schema, body, "application/json", 10).y.tolist() == [2, 1]
    for task, y, words in [("kitchen", "sow", "its classes: cut, stir"),
                           ("kitchen", 2, "0..1"), ("attic", "dig", "no class list")]:
        body = orjson.dumps({"task": task, "x": [0] * 6, "y": y})
        with pytest.raises(SampleError, match=words):
            parse_body(schema, body, "application/json", 10)
    shared_head = {"head": "shared", "input_shape": [2], "classes": {"a": ["x", "y"]}}
    with pytest.raises(ConfigError, match="per_task"):
        stream_schema(build_config({"stream": shared_head}))


@pytest.mark.parametrize("field", ["dtype", "scale", "task", "y", "shape", "request_id",
                                   "sender", "sender_seq"])
@pytest.mark.parametrize("value", [[], {}, None, True, 1.5, "x"])
def test_a_binary_header_field_of_any_json_type_is_a_400(field, value):
    header = {"task": "a", "y": [0], "dtype": "float32", field: value}
    body = orjson.dumps(header) + b"\n" + np.zeros(6, "<f4").tobytes()
    try:
        parse_body(SCHEMA, body, BINARY_TYPE, 10)
    except SampleError as e:
        assert e.status == 400
    else:  # the values valid for their field (a request_id may be absent: null)
        assert (field, value) in {("task", "x"), ("request_id", "x"), ("request_id", None),
                                  ("sender", None), ("sender_seq", None)}


def test_a_sender_numbers_its_batches_and_binary_requests():
    sample = {"task": "a", "x": [0] * 6, "y": 0}
    batch = parse({"samples": [sample], "sender": "cam-1", "sender_seq": 7})
    assert batch.sender == Sender("cam-1", 7)
    head = {"task": "a", "y": [0], "sender": "cam-1", "sender_seq": 8, "request_id": "r8"}
    binary = parse(orjson.dumps(head) + b"\n" + np.zeros(6, "<f4").tobytes(), BINARY_TYPE)
    assert (binary.sender, binary.request_id) == (Sender("cam-1", 8), "r8")
    assert parse({"samples": [sample]}).sender is None
    for extra, words in [({"sender": "cam-1"}, "go together"), ({"sender_seq": 1}, "together"),
                         ({"sender": "c", "sender_seq": 0}, "not a message number"),
                         ({"sender": "c", "sender_seq": True}, "not a message number"),
                         ({"sender": "c", "sender_seq": 2**63}, "not a message number"),
                         ({"sender": "a b", "sender_seq": 1}, "not a sender name")]:
        assert words in str(refused({"samples": [sample], **extra}))


def test_a_binary_header_says_the_rows_shape_and_a_transposed_one_is_refused():
    rows = np.zeros((1, *SHAPE), "<f4").tobytes()
    ok = orjson.dumps({"task": "a", "y": [0], "shape": list(SHAPE)}) + b"\n" + rows
    assert parse_body(SCHEMA, ok, BINARY_TYPE, 10).x.shape == (1, *SHAPE)
    flipped = orjson.dumps({"task": "a", "y": [0], "shape": list(SHAPE[::-1])}) + b"\n" + rows
    with pytest.raises(SampleError, match=r"rows shaped \[3, 2\]; this stream's samples are"):
        parse_body(SCHEMA, flipped, BINARY_TYPE, 10)
