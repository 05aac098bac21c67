"""Shared fixtures: real services in real processes on loopback."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request

import pytest

from harness.procs import ServiceProcess, free_port, modelcast_argv

S3_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A real S3-compatible server (moto in server mode) as a separate process."""
    port = free_port()
    log = tmp_path_factory.mktemp("moto") / "moto.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
            stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **S3_ENV},
        )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            urllib.request.urlopen(url + "/moto-api/", timeout=1)
            break
        except OSError:
            if time.monotonic() > deadline or proc.poll() is not None:
                proc.kill()
                pytest.fail(f"moto server did not start; log: {log.read_text()[-2000:]}")
            time.sleep(0.1)
    saved = {k: os.environ.get(k) for k in S3_ENV}
    os.environ.update(S3_ENV)
    yield url
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    proc.terminate()
    proc.wait(10)


@pytest.fixture
def s3_bucket(s3_server):
    """A fresh bucket on the S3 server; yields (endpoint_url, bucket)."""
    import uuid

    import boto3

    name = f"mc-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_server, **_boto_kwargs()).create_bucket(Bucket=name)
    return s3_server, name


def _boto_kwargs() -> dict:
    return {"aws_access_key_id": S3_ENV["AWS_ACCESS_KEY_ID"], "aws_secret_access_key": S3_ENV["AWS_SECRET_ACCESS_KEY"],
            "region_name": S3_ENV["AWS_DEFAULT_REGION"]}


@pytest.fixture
def tracker(tmp_path):
    """A registry + tracker process on 127.0.0.1 with token 'secret'; yields its URL."""
    port = free_port()
    svc = ServiceProcess(
        modelcast_argv("tracker", "--listen", f"127.0.0.1:{port}", "--data", str(tmp_path / "registry"),
                       "--token", "secret"),
        health_url=f"http://127.0.0.1:{port}/v1/health",
        log_path=tmp_path / "logs" / "tracker.log", env=S3_ENV, name="tracker",
    )
    svc.start()
    svc.url = f"http://127.0.0.1:{port}"
    yield svc
    svc.stop()


@pytest.fixture
def node_factory(tmp_path):
    """Start real node daemons (``start(registry, name, *flags, host=...)``); all stopped at the end."""
    from .helpers import start_node

    started: list[ServiceProcess] = []

    def start(registry: str, name: str, *extra: str, host: str = "127.0.0.1", zone: str = "default"):
        svc = start_node(tmp_path, registry, name, host, zone, *extra)
        started.append(svc)
        return svc

    yield start
    for svc in started:
        svc.stop()
