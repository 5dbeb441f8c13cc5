"""The OpenAPI document served at ``/openapi.json``.

The routes read their bodies by hand (strict pydantic parsing, size limit, OpenAI error envelopes), so
FastAPI cannot see their request models. This module puts them back: each POST route gets its pydantic
model as ``requestBody``, every route documents its OpenAI-style error responses, and FastAPI's
``422 HTTPValidationError`` (which this server never returns) is removed. Schema fuzzers (schemathesis,
tests/test_fuzz.py) and ``/docs`` read this document.
"""

from __future__ import annotations

from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel

ERROR_SCHEMA = {
    "type": "object",
    "title": "ErrorResponse",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["message", "type", "param", "code"],
            "properties": {
                "message": {"type": "string"},
                "type": {"type": "string"},
                "param": {"type": ["string", "null"]},
                "code": {"type": ["string", "integer", "null"]},
            },
        }
    },
}

_ERRORS = {
    "400": "Invalid request (OpenAI error envelope)",
    "401": "Missing or wrong API key (when the server has one)",
    "404": "Unknown model or route",
    "413": "Request body larger than --max-body-bytes",
    "500": "Internal error (e.g. out of memory while computing)",
    "503": "Model still loading or queue full (see Retry-After)",
}


def build_openapi(app, bodies: dict[str, type[BaseModel]]) -> dict:
    """FastAPI's document for ``app`` plus request bodies (``bodies``: path -> model) and error responses."""
    if app.openapi_schema:
        return app.openapi_schema
    doc = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
    schemas = doc.setdefault("components", {}).setdefault("schemas", {})
    schemas.pop("HTTPValidationError", None)
    schemas.pop("ValidationError", None)
    schemas["ErrorResponse"] = ERROR_SCHEMA
    error_content = {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}}
    for path, item in doc.get("paths", {}).items():
        for method, op in item.items():
            responses = op.setdefault("responses", {})
            responses.pop("422", None)
            model = bodies.get(path)
            if model is not None and method == "post":
                body = model.model_json_schema(ref_template="#/components/schemas/{model}")
                schemas.update(body.pop("$defs", {}))
                schemas[model.__name__] = body
                op["requestBody"] = {"required": True, "content": {
                    "application/json": {"schema": {"$ref": f"#/components/schemas/{model.__name__}"}}}}
            if path == "/metrics":
                responses["200"] = {"description": "Prometheus text exposition format",
                                    "content": {"text/plain": {"schema": {"type": "string"}}}}
            if path == "/health":  # its own {"status": ...} bodies
                continue
            for code, text in _ERRORS.items():
                responses.setdefault(code, {"description": text, "content": error_content})
    app.openapi_schema = doc
    return doc
