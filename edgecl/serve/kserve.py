"""KServe v2 inference messages (JSON), with Triton's binary tensor data extension.

A request holds one FP32 tensor. Its values come either in "data" (numbers, flat or nested,
row-major) or, with the binary extension, as raw little-endian float32 bytes after the JSON,
whose length the `Inference-Header-Content-Length` HTTP header gives (the input then says
`"parameters": {"binary_data_size": N}`). Logits go back as JSON numbers, or as raw bytes when the
request asks for binary output (`"parameters": {"binary_data_output": true}` on the request or
`{"binary_data": true}` on its output): Triton's own client does both by default.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson

from edgecl.repository import Manifest, TensorSpec
from edgecl.web import RequestError, json_may_hold_booleans

BINARY_HEADER = "Inference-Header-Content-Length"


@dataclass(frozen=True, eq=False)
class InferRequest:
    x: np.ndarray  # float32 [batch, *input_shape], all finite
    id: Any
    binary_output: bool


def parse_request(body: bytes, json_length: str | None, spec: TensorSpec,
                  max_batch: int | None = None) -> InferRequest:
    """Decode and check a request body against the model's input `spec`; a batch of more than
    `max_batch` rows is a 413."""
    header, binary = _split(body, json_length)
    request = parse_json(header)
    if not isinstance(request.get("id", ""), str):  # KServe v2: a string; echoed back as sent
        raise RequestError(400, '"id" must be a string')
    tensor = _one_input(request, spec)
    if max_batch is not None and tensor["shape"][0] > max_batch:
        raise RequestError(413, f"a batch of {tensor['shape'][0]:,} rows is over the limit of "
                                f"{max_batch:,} rows per request; send it in parts")
    shape = tensor["shape"]
    params = tensor.get("parameters")
    if isinstance(params, dict) and "binary_data_size" in params:
        x = _from_binary(binary, params["binary_data_size"], shape)
    elif binary:
        raise RequestError(400, "binary data sent but the input has no binary_data_size")
    else:
        x = _from_numbers(tensor.get("data"), shape, json_may_hold_booleans(header))
    bad = x.size - int(np.isfinite(x).sum())
    if bad:
        raise RequestError(400, f"the input has {bad} non-finite value(s): NaN, Inf or beyond "
                                "float32's range")
    return InferRequest(x, request.get("id"), _wants_binary(request))


def parse_json(data: bytes) -> dict[str, Any]:
    """orjson: 8x faster than the json module on a batch of floats, the bulk of a request."""
    try:
        request = orjson.loads(data)
    except orjson.JSONDecodeError as e:  # also bad UTF-8, NaN literals, nesting over 1024
        raise RequestError(400, f"malformed JSON: {e}") from None
    if not isinstance(request, dict):
        raise RequestError(400, 'the body must be a JSON object {"inputs": [...]}')
    return request


def _split(body: bytes, json_length: str | None) -> tuple[bytes, bytes]:
    if json_length is None:
        return body, b""
    if not (json_length.isascii() and json_length.isdigit()) or int(json_length) > len(body):
        raise RequestError(400, f"{BINARY_HEADER} {json_length!r} is not a length within the "
                                f"{len(body)}-byte body")
    n = int(json_length)
    return body[:n], body[n:]


def _one_input(request: dict[str, Any], spec: TensorSpec) -> dict[str, Any]:
    inputs = request.get("inputs")
    if not isinstance(inputs, list) or len(inputs) != 1 or not isinstance(inputs[0], dict):
        raise RequestError(400, '"inputs" must be a list of one tensor '
                                '{"name", "shape", "datatype", "data"}')
    tensor = inputs[0]
    if tensor.get("name") != spec.name:
        raise RequestError(400, f"unknown input {tensor.get('name')!r}; the model's input is "
                                f"{spec.name!r}")
    if tensor.get("datatype") != spec.datatype:
        raise RequestError(400, f"datatype must be {spec.datatype}, got {tensor.get('datatype')!r}")
    shape = tensor.get("shape")
    if not (isinstance(shape, list) and len(shape) == len(spec.shape)
            and all(type(d) is int for d in shape) and shape[0] >= 1
            and shape[1:] == spec.shape[1:]):
        raise RequestError(400, f"shape must be [batch >= 1, {', '.join(map(str, spec.shape[1:]))}]"
                                f", got {shape!r}")
    return tensor


def _from_numbers(data: Any, shape: list[int], may_hold_booleans: bool) -> np.ndarray:
    if not isinstance(data, list):
        raise RequestError(400, '"data" must be a list of numbers')
    try:
        values = np.asarray(data)
    except ValueError:  # ragged nesting
        raise RequestError(400, '"data" must be a flat or evenly nested list of numbers') from None
    if values.dtype.kind not in "iuf" or (may_hold_booleans and _holds_a_boolean(data)):
        raise RequestError(400, '"data" must hold only numbers (found strings, booleans or null)')
    if values.size != math.prod(shape):
        raise RequestError(400, f'"data" has {values.size} values; shape {shape} needs '
                                f"{math.prod(shape)}")
    with np.errstate(over="ignore"):  # beyond float32's range becomes inf, refused later
        return values.astype(np.float32).reshape(shape)


def _holds_a_boolean(data: list[Any]) -> bool:
    """numpy reads [true, 0.5] as [1.0, 0.5]; look at each value (only when the body has a
    true/false literal somewhere)."""
    return any(type(v) is bool for v in np.asarray(data, dtype=object).ravel())


def _from_binary(binary: bytes, size: Any, shape: list[int]) -> np.ndarray:
    needed = 4 * math.prod(shape)
    if size != len(binary) or size != needed:
        raise RequestError(400, f"binary_data_size {size!r} must equal the {len(binary)} bytes "
                                f"after the JSON header and the {needed} bytes shape {shape} "
                                "needs in FP32")
    return np.frombuffer(binary, dtype="<f4").reshape(shape)


def _wants_binary(request: dict[str, Any]) -> bool:
    params = request.get("parameters")
    if isinstance(params, dict) and params.get("binary_data_output") is True:
        return True
    outputs = request.get("outputs")
    return isinstance(outputs, list) and any(
        isinstance(o, dict) and isinstance(o.get("parameters"), dict)
        and o["parameters"].get("binary_data") is True for o in outputs)


def encode_response(manifest: Manifest, logits: np.ndarray, request: InferRequest
                    ) -> tuple[bytes, int | None]:
    """(body, length of its JSON part when binary data follows it, else None)."""
    output: dict[str, Any] = {"name": manifest.output.name, "shape": list(logits.shape),
                              "datatype": "FP32"}
    raw = b""
    if request.binary_output:
        raw = logits.astype("<f4").tobytes()
        output["parameters"] = {"binary_data_size": len(raw)}
    else:
        output["data"] = logits.ravel().tolist()
    message: dict[str, Any] = {"model_name": manifest.task,
                               "model_version": str(manifest.version), "outputs": [output]}
    if request.id is not None:
        message["id"] = request.id
    header = orjson.dumps(message)
    return header + raw, len(header) if raw else None


def metadata(m: Manifest) -> dict[str, Any]:
    """KServe v2 model metadata, plus the manifest's facts a client needs under `parameters`."""
    return {
        "name": m.task, "versions": [str(m.version)], "platform": "onnxruntime_onnx",
        "inputs": [m.input.model_dump()], "outputs": [m.output.model_dump()],
        "parameters": {"classes": m.classes, "normalisation": m.normalisation,
                       "input_range": m.input_range, "method": m.method, "created": m.created,
                       "sha256": m.sha256, "opset": m.opset},
    }
