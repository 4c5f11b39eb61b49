"""An S3 endpoint for tests: moto in server mode on 127.0.0.1, reached over real HTTP.

Import the fixtures into a test module (``from s3_server import moto_s3, s3_target_url``);
they skip (or fail under LODESTORE_REQUIRE_SERVICES=1) when moto cannot start.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from conftest import service_missing

BUCKET = "lodestore-test"
REGION = "us-east-1"
KEY_ID = SECRET = "testing"


def start_moto(bucket: str = BUCKET) -> tuple[Any, str, str]:
    """Start moto on an ephemeral port and create ``bucket``: (server, endpoint, bucket)."""
    import boto3
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        endpoint = f"http://{host}:{port}"
        s3 = boto3.client(
            "s3",
            endpoint_url=endpoint,
            region_name=REGION,
            aws_access_key_id=KEY_ID,
            aws_secret_access_key=SECRET,
        )
        s3.create_bucket(Bucket=bucket)
    except BaseException:
        server.stop()
        raise
    return server, endpoint, bucket


def target_url(endpoint: str, bucket: str, prefix: str) -> str:
    return (
        f"s3://{bucket}/{prefix}?endpoint={endpoint}&allow_http=true&region={REGION}"
        f"&access_key_id={KEY_ID}&secret_access_key={SECRET}"
    )


@pytest.fixture(scope="module")
def moto_s3() -> Iterator[tuple[str, str]]:
    """(endpoint, bucket) of a moto server shared by one test module."""
    try:
        server, endpoint, bucket = start_moto()
    except Exception as exc:  # noqa: BLE001 - ImportError, bind or startup failure alike
        service_missing(f"moto S3 server could not start: {exc!r}")
    yield endpoint, bucket
    server.stop()


@pytest.fixture
def s3_target_url(moto_s3: tuple[str, str]) -> str:
    """A target URL under a fresh random prefix of the shared bucket."""
    endpoint, bucket = moto_s3
    return target_url(endpoint, bucket, f"t-{uuid.uuid4().hex[:12]}")
