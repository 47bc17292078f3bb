"""The OpenAPI 3.0 description of the daemon's HTTP API, served at /openapi.json.

It is the daemon's own: the sample's `x` length, label range, class names and batch limit
come from its schema, so a request valid under this document is one the daemon accepts (unless
it is over `max_tasks`, 409, or the learner lags, 429), and tests can fuzz against it.
"""

from __future__ import annotations

from typing import Any

from edgecl.daemon.schema import FLOAT32_MAX
from edgecl.repository import TASK_ID
from edgecl.setup import SampleSchema

_TASK = {"type": "string", "pattern": f"^{TASK_ID.pattern}$"}
_ERROR = {"description": "what is wrong", "content": {"application/json": {"schema": {
    "$ref": "#/components/schemas/Error"}}}}
_ACK = {"description": "durable: journaled and fsync'd", "content": {"application/json": {
    "schema": {"$ref": "#/components/schemas/Ack"}}}}
_DENIED = {"description": "missing or wrong bearer token", "content": {"application/json": {
    "schema": {"$ref": "#/components/schemas/Error"}}}}


def _json(ref: str) -> dict[str, Any]:
    return {"application/json": {"schema": {"$ref": f"#/components/schemas/{ref}"}}}


def _ok(description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": {
        "type": "object"}}}}


_TASK_PARAM = [{"name": "task", "in": "path", "required": True, "schema": _TASK}]


def openapi(schema: SampleSchema, max_request_samples: int) -> dict[str, Any]:
    """The document for a daemon taking `schema`'s samples, at most `max_request_samples` a
    request."""
    paths = {path: {method: op if op.get("security") == [] else
                    {**op, "responses": {**op["responses"], "401": _DENIED}}
                    for method, op in ops.items()} for path, ops in _DOCUMENT["paths"].items()}
    return {**_DOCUMENT, "paths": paths, "components": {**_DOCUMENT["components"], "schemas": {
        **_DOCUMENT["components"]["schemas"], **_sample_schemas(schema, max_request_samples)}}}


def _sample_schemas(schema: SampleSchema, max_request_samples: int) -> dict[str, Any]:
    number = {"type": "number", "minimum": -FLOAT32_MAX, "maximum": FLOAT32_MAX}
    return {
        "Sample": {"type": "object", "required": ["task", "x", "y"],
                   "additionalProperties": False, "properties": {
                       "task": _TASK,
                       "x": {"type": "array", "items": number, "minItems": schema.size,
                             "maxItems": schema.size,
                             "description": f"the input's {schema.size} values, flat "
                                            f"(row-major); nested to {list(schema.input_shape)} "
                                            "is accepted too"},
                       "y": {"oneOf": [{"type": "integer", "minimum": 0,
                                        "maximum": schema.n_classes - 1},
                                       {"type": "string", "enum": _class_names(schema)}],
                             "description": "label index or class name"}}},
        "Batch": {"type": "object", "required": ["samples"], "additionalProperties": False,
                  "properties": {"samples": {"type": "array", "minItems": 1,
                                             "maxItems": max_request_samples,
                                             "items": {"$ref": "#/components/schemas/Sample"}}}},
    }


_DOCUMENT: dict[str, Any] = {
    "openapi": "3.0.3",
    "info": {"title": "edgecl learn", "version": "1",
             "description": "On-device continual learning daemon: ingest labelled samples, "
                            "learn them once, checkpoint, publish per-task models."},
    "security": [{"bearer": []}],
    "paths": {
        "/v1/samples": {"post": {
            "summary": "Accept samples: one, a batch, NDJSON lines or the binary form",
            "requestBody": {"required": True, "content": {
                "application/json": {"schema": {"oneOf": [
                    {"$ref": "#/components/schemas/Sample"},
                    {"$ref": "#/components/schemas/Batch"}]}},
                "application/x-ndjson": {"schema": {"type": "string"}},
                "application/vnd.edgecl.samples": {"schema": {"type": "string",
                                                              "format": "binary"}}}},
            "responses": {"202": _ACK, "400": _ERROR, "409": _ERROR, "413": _ERROR,
                          "415": _ERROR, "429": _ERROR, "507": _ERROR}}},
        "/v1/tasks/{task}/end": {"post": {
            "summary": "Journal an end-of-task marker: the learner consolidates the task there",
            "description": "With `samples`, the end waits (learn.end_wait_s at most, then 409) "
                           "until that many samples of the task have arrived on any transport.",
            "parameters": _TASK_PARAM,
            "requestBody": {"required": False, "content": {"application/json": {"schema": {
                "type": "object", "additionalProperties": False, "properties": {
                    "samples": {"type": "integer", "minimum": 0, "maximum": 2**62}}}}}},
            "responses": {"202": _ACK, "400": _ERROR, "404": _ERROR, "409": _ERROR,
                          "507": _ERROR}}},
        "/v1/schema": {"get": {"summary": "What a sample must look like: input shape, classes",
                               "responses": {"200": _ok("the sample schema")}}},
        "/v1/tasks/{task}/export": {"post": {
            "summary": "Export the task's model into the repository now",
            "parameters": _TASK_PARAM,
            "responses": {"202": _ok("queued"), "400": _ERROR, "404": _ERROR,
                          "409": _ERROR}}},
        "/v1/checkpoint": {"post": {"summary": "Checkpoint now",
                                    "responses": {"200": _ok("the checkpoint written")}}},
        "/v1/evaluate": {"post": {"summary": "Held-out accuracy of every task now",
                                  "responses": {"200": _ok("accuracy per task")}}},
        "/v1/status": {"get": {"summary": "Counts, journal lag, tasks, checkpoints, footprint",
                               "responses": {"200": _ok("status")}}},
        "/healthz": {"get": {"summary": "Liveness (no token needed)", "security": [],
                             "responses": {"200": _ok("live")}}},
        "/readyz": {"get": {"summary": "Ready once restore and replay are done",
                            "responses": {"200": _ok("ready"), "503": _ok("not yet")}}},
        "/metrics": {"get": {"summary": "Prometheus metrics", "responses": {"200": {
            "description": "text exposition format",
            "content": {"text/plain": {"schema": {"type": "string"}}}}}}},
        "/openapi.json": {"get": {"summary": "This document",
                                  "responses": {"200": _ok("OpenAPI 3.0")}}},
    },
    "components": {
        "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        "schemas": {
            "Ack": {"type": "object", "required": ["first_seq", "count"], "properties": {
                "first_seq": {"type": "integer"}, "count": {"type": "integer"}}},
            "Error": {"type": "object", "required": ["error"],
                      "properties": {"error": {"type": "string"}}},
        },
    },
}


def _class_names(schema: SampleSchema) -> list[str]:
    """Every class name of every task, in first-seen order."""
    return list(dict.fromkeys([*schema.classes, *(c for names in schema.task_classes.values()
                                                 for c in names)]))
