"""Credentials never leave through a logged, shipped or rendered URI or config (pure)."""

from __future__ import annotations

import pytest

from orchestrator.redact import REDACTED, redact, redact_uri, tracking_credentials, userinfo


@pytest.mark.parametrize("uri, expected", [
    ("http://alice:s3cr%40t@mlflow.example:5000/path?x=1", "http://mlflow.example:5000/path?x=1"),
    ("https://token@host", "https://host"),
    ("postgresql://u:p@db:5432/mlflow?sslmode=require&password=p", "postgresql://db:5432/mlflow?sslmode=require"),
    ("sqlite:////tmp/mlflow.db", "sqlite:////tmp/mlflow.db"),
    ("http://127.0.0.1:5000", "http://127.0.0.1:5000"),
    ("runs/local", "runs/local"),
])
def test_redact_uri_drops_userinfo_and_secret_parameters(uri: str, expected: str) -> None:
    assert redact_uri(uri) == expected


def test_credentials_move_to_mlflows_variables() -> None:
    assert userinfo("http://alice:s3cr%40t@host") == ("alice", "s3cr@t")
    assert userinfo("http://host") is None and userinfo("plain") is None
    assert tracking_credentials("http://alice:s3cr%40t@host") == {
        "MLFLOW_TRACKING_USERNAME": "alice", "MLFLOW_TRACKING_PASSWORD": "s3cr@t"}
    assert tracking_credentials("http://host:5000") == {}


def test_redact_walks_a_config() -> None:
    config = {"tracking": {"tracking_uri": "http://a:b@h", "experiment": "x"},
              "data": {"path": ["s3://k:v@bucket/p", "local"]}, "extra": {"api_token": "abc", "empty_password": ""}}
    assert redact(config) == {"tracking": {"tracking_uri": "http://h", "experiment": "x"},
                              "data": {"path": ["s3://bucket/p", "local"]},
                              "extra": {"api_token": REDACTED, "empty_password": ""}}
    assert "b@" not in str(redact(config))
