"""The HTTP layer's own pieces, without an engine: error shapes, field names in validation errors,
the 500 handler, settings validation and the Prometheus histogram."""

from __future__ import annotations

import logging

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from mgpu.server.app import ServerConfig
from mgpu.server.errors import install_error_handlers, validation_error


def test_unexpected_exception_is_a_500_without_details(caplog: pytest.LogCaptureFixture) -> None:
    app = FastAPI()
    install_error_handlers(app)

    @app.get("/boom")
    async def boom() -> None:
        raise RuntimeError("secret internal detail")

    client = TestClient(app, raise_server_exceptions=False)
    with caplog.at_level(logging.ERROR, logger="mgpu.server"):
        response = client.get("/boom")
    assert response.status_code == 500
    error = response.json()["error"]
    assert error["type"] == "server_error"
    assert "secret" not in response.text and "Traceback" not in response.text
    assert "secret internal detail" in caplog.text  # the traceback stays in the server log


@pytest.mark.parametrize(
    ("errors", "param", "words"),
    [
        (
            [{"type": "json_invalid", "loc": ("body", 3), "msg": "x", "ctx": {"error": "bad"}}],
            None,
            "not valid JSON",
        ),
        (
            [{"type": "missing", "loc": ("body", "prompt"), "msg": "Field required"}],
            "prompt",
            "'prompt' is required",
        ),
        (
            [
                {
                    "type": "literal_error",
                    "loc": ("body", "messages", 2, "role"),
                    "msg": "Input should",
                }
            ],
            "messages[2].role",
            "Input should",
        ),
        (
            [
                {"type": "string_type", "loc": ("body", "prompt", "str"), "msg": "a"},
                {"type": "list_type", "loc": ("body", "prompt", "list[int]"), "msg": "b"},
            ],
            "prompt",
            "str, list[int]",
        ),
        (
            [
                {
                    "type": "model_attributes_type",
                    "loc": ("body",),
                    "msg": "Input should be an object",
                }
            ],
            None,
            "JSON object",
        ),
    ],
)
def test_validation_errors_name_the_field(errors: list, param: str | None, words: str) -> None:
    error = validation_error(errors)
    assert error.status == 400
    assert error.param == param
    assert words in error.message
    assert error.body()["error"]["type"] == "invalid_request_error"


def test_server_config_is_validated() -> None:
    with pytest.raises(ValueError, match="max_request_bytes"):
        ServerConfig("m", max_request_bytes=0)
    with pytest.raises(ValueError, match="api_key"):
        ServerConfig("m", api_key="")
    with pytest.raises(ValueError, match="served_model_name"):
        ServerConfig("")
