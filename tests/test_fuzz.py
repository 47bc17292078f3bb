"""Property-based fuzzing of what clients send: every generated body is either accepted as what
it says or refused with a 4xx that names the problem; nothing else ever escapes the parsers."""

import numpy as np
import orjson
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from learn_helpers import CLASSES, SHAPE, stream_config

from edgecl.daemon.schema import BINARY_TYPE, SampleError, parse_body
from edgecl.repository import TensorSpec
from edgecl.serve.kserve import parse_request
from edgecl.setup import stream_schema
from edgecl.web import RequestError

SCHEMA = stream_schema(stream_config())
SIZE = int(np.prod(SHAPE))
# no subnormals: a learner elsewhere in the suite turns on torch.set_flush_denormal, process-wide
FLOATS = st.floats(allow_nan=False, allow_infinity=False, allow_subnormal=False)
SMALL_FLOATS = st.floats(-1e6, 1e6, allow_subnormal=False)
JSON_SCALARS = (st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | FLOATS
                | st.text(max_size=8))
JSON = st.recursive(JSON_SCALARS, lambda inner: st.lists(inner, max_size=8)
                    | st.dictionaries(st.text(max_size=6), inner, max_size=4), max_leaves=40)
NUMBERS = st.lists(SMALL_FLOATS | st.integers(-1000, 1000) | st.booleans(),
                   min_size=SIZE - 1, max_size=SIZE + 1)
VALID_X = st.lists(SMALL_FLOATS | st.integers(-1000, 1000), min_size=SIZE, max_size=SIZE)
VALID_RECORD = st.fixed_dictionaries({"task": st.sampled_from(["site-a", "b.2"]), "x": VALID_X,
                                      "y": st.sampled_from([0, 1, 2, "run", "sit"])})
FUZZY_RECORD = st.fixed_dictionaries(
    {"task": st.sampled_from(["site-a", "b.2", "", "../x", "a" * 129]) | JSON,
     "x": NUMBERS | st.just([[1.0] * SHAPE[1]] * SHAPE[0]) | JSON,
     "y": st.sampled_from([0, 2, 3, -1, "run", "swim", True]) | JSON},
    optional={"extra": JSON})
RECORD = VALID_RECORD | FUZZY_RECORD
BODY = (RECORD | st.fixed_dictionaries({"samples": st.lists(VALID_RECORD, min_size=1, max_size=5)})
        | st.fixed_dictionaries({"samples": st.lists(RECORD, max_size=5)}) | JSON)
FUZZ = settings(max_examples=400, deadline=None,
                suppress_health_check=[HealthCheck.too_slow])


def check_samples(samples) -> None:
    assert samples.x.dtype == np.float32 and samples.x.shape == (len(samples), *SHAPE)
    assert np.isfinite(samples.x).all()
    assert samples.y.dtype == np.int64 and ((samples.y >= 0) & (samples.y < len(CLASSES))).all()


@FUZZ
@given(body=BODY)
def test_json_samples_are_accepted_as_sent_or_refused_with_a_4xx(body):
    raw = orjson.dumps(body)
    try:
        samples = parse_body(SCHEMA, raw, "application/json", 100)
    except SampleError as e:
        assert 400 <= e.status < 500 and str(e)
        return
    check_samples(samples)
    records = body.get("samples", [body])
    for record, x in zip(records, samples.x, strict=True):
        assert not any(type(v) is bool for v in np.ravel(np.asarray(record["x"], dtype=object)))
        np.testing.assert_array_equal(x.ravel(), np.asarray(record["x"], np.float32).ravel())


@FUZZ
@given(header=st.fixed_dictionaries({"task": st.sampled_from(["a", "", 3]),
                                     "y": st.lists(st.sampled_from([0, 1, "sit", 7, None]),
                                                   max_size=4)},
                                    optional={"dtype": st.sampled_from(["float32", "uint8", 1]),
                                              "scale": JSON_SCALARS}) | JSON,
       payload=st.binary(max_size=128), newline=st.booleans())
def test_binary_samples_are_accepted_or_refused_with_a_4xx(header, payload, newline):
    raw = orjson.dumps(header) + (b"\n" if newline else b"") + payload
    try:
        check_samples(parse_body(SCHEMA, raw, BINARY_TYPE, 100))
    except SampleError as e:
        assert 400 <= e.status < 500 and str(e)


INPUT = TensorSpec(name="input", shape=[-1, *SHAPE])
VALID_TENSOR = st.fixed_dictionaries({"name": st.just("input"), "shape": st.just([1, *SHAPE]),
                                      "datatype": st.just("FP32"), "data": VALID_X})
FUZZY_TENSOR = st.fixed_dictionaries(
    {"name": st.sampled_from(["input", "x"]) | JSON, "shape": st.sampled_from(
        [[1, *SHAPE], [2, *SHAPE], [0, *SHAPE], [1, 6]]) | JSON,
     "datatype": st.sampled_from(["FP32", "FP64"]) | JSON,
     "data": NUMBERS | JSON}, optional={"parameters": JSON})
REQUEST = st.fixed_dictionaries(
    {"inputs": st.lists(VALID_TENSOR, min_size=1, max_size=1)
     | st.lists(VALID_TENSOR | FUZZY_TENSOR, max_size=2) | JSON},
    optional={"id": st.text(max_size=8) | JSON, "parameters": JSON, "outputs": JSON})


@FUZZ
@given(body=REQUEST | JSON)
def test_infer_requests_are_parsed_or_refused_with_a_4xx(body):
    try:
        request = parse_request(orjson.dumps(body), None, INPUT)
    except RequestError as e:
        assert 400 <= e.status < 500 and str(e)
        return
    assert request.x.dtype == np.float32 and request.x.shape[1:] == SHAPE
    assert np.isfinite(request.x).all() and (request.id is None or isinstance(request.id, str))
    assert not any(type(v) is bool for v in np.ravel(np.asarray(body["inputs"][0]["data"],
                                                                dtype=object)))
