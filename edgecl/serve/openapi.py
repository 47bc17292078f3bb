"""The OpenAPI 3.0 description of `edgecl serve`'s REST API (KServe v2), served at /openapi.json.

The input tensor's name, shape and size depend on the model a task serves (GET
/v2/models/{task} tells), so the request schema here is the protocol's, not a model's.
"""

from __future__ import annotations

from typing import Any

_ERROR = {"description": "what is wrong", "content": {"application/json": {"schema": {
    "$ref": "#/components/schemas/Error"}}}}
_DENIED = {**_ERROR, "description": "missing or wrong bearer token"}
_PARAMS = {name: {"name": name, "in": "path", "required": True,
                  "schema": {"type": "string", "pattern": "^[^/]+$"}}
           for name in ("task", "version")}


def _ok(description: str, schema: str | None = None) -> dict[str, Any]:
    body = {"$ref": f"#/components/schemas/{schema}"} if schema else {"type": "object"}
    return {"description": description, "content": {"application/json": {"schema": body}}}


def _model_get(summary: str, body: str | None, *params: str) -> dict[str, Any]:
    return {"get": {"summary": summary, "parameters": [_PARAMS[p] for p in params],
                    "responses": {"200": _ok(summary, body), "401": _DENIED, "404": _ERROR}}}


def _infer(*params: str) -> dict[str, Any]:
    return {"post": {
        "summary": "Logits of a batch of inputs (binary tensor data: see docs/serve.md)",
        "parameters": [_PARAMS[p] for p in params],
        "requestBody": {"required": True, "content": {"application/json": {"schema": {
            "$ref": "#/components/schemas/InferRequest"}}}},
        "responses": {"200": _ok("the logits", "InferResponse"), "400": _ERROR, "401": _DENIED,
                      "404": _ERROR, "408": _ERROR, "413": _ERROR}}}


# shape -1: any size (a model's batch axis)
_TENSOR = {"type": "object", "required": ["name", "shape", "datatype"], "properties": {
    "name": {"type": "string"}, "datatype": {"type": "string"},
    "shape": {"type": "array", "items": {"type": "integer", "minimum": -1}},
    "parameters": {"type": "object"}}}
_SIZES = {"type": "array", "items": {"type": "integer", "minimum": 0}}

OPENAPI: dict[str, Any] = {
    "openapi": "3.0.3",
    "info": {"title": "edgecl serve", "version": "1",
             "description": "Per-task ONNX models over the KServe v2 REST protocol."},
    "security": [{"bearer": []}],
    "paths": {
        "/v2/health/live": {"get": {"summary": "Liveness", "security": [],
                                    "responses": {"200": _ok("live")}}},
        "/v2/health/ready": {"get": {"summary": "Ready once a model is served", "security": [],
                                     "responses": {"200": _ok("ready"),
                                                   "503": _ok("no model yet")}}},
        "/v2": {"get": {"summary": "Server metadata",
                        "responses": {"200": _ok("name, version, extensions"),
                                      "401": _DENIED}}},
        "/v2/models/{task}": _model_get("Model metadata", "ModelMetadata", "task"),
        "/v2/models/{task}/ready": _model_get("Model readiness", None, "task"),
        "/v2/models/{task}/versions/{version}": _model_get("Model metadata", "ModelMetadata",
                                                           "task", "version"),
        "/v2/models/{task}/infer": _infer("task"),
        "/v2/models/{task}/versions/{version}/infer": _infer("task", "version"),
        "/metrics": {"get": {"summary": "Prometheus metrics", "responses": {
            "200": {"description": "text exposition format",
                    "content": {"text/plain": {"schema": {"type": "string"}}}},
            "401": _DENIED}}},
        "/openapi.json": {"get": {"summary": "This document",
                                  "responses": {"200": _ok("OpenAPI 3.0"), "401": _DENIED}}},
    },
    "components": {
        "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        "schemas": {
            "InferRequest": {"type": "object", "required": ["inputs"], "properties": {
                "id": {"type": "string"},
                "inputs": {"type": "array", "minItems": 1, "maxItems": 1, "items": {
                    **_TENSOR, "required": ["name", "shape", "datatype", "data"],
                    "properties": {**_TENSOR["properties"], "datatype": {"enum": ["FP32"]},
                                   "shape": _SIZES,
                                   "data": {"type": "array", "items": {}}}}},
                "outputs": {"type": "array", "items": {"type": "object"}},
                "parameters": {"type": "object"}}},
            "InferResponse": {"type": "object", "required": ["model_name", "outputs"],
                              "properties": {"model_name": {"type": "string"},
                                             "model_version": {"type": "string"},
                                             "id": {"type": "string"},
                                             "outputs": {"type": "array", "items": _TENSOR}}},
            "ModelMetadata": {"type": "object", "required": ["name", "inputs", "outputs"],
                              "properties": {"name": {"type": "string"},
                                             "versions": {"type": "array"},
                                             "inputs": {"type": "array", "items": _TENSOR},
                                             "outputs": {"type": "array", "items": _TENSOR}}},
            "Error": {"type": "object", "required": ["error"],
                      "properties": {"error": {"type": "string"}}},
        },
    },
}
