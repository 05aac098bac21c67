"""Shared fixtures: real services in real processes on loopback, and the registry tests' parts.

Plain functions (tokens, the CLI, artifact builders, readers, waits) are in helpers.py;
the process starters are harness.start_tracker / harness.start_node.
"""

from __future__ import annotations

import hashlib
import os
import shlex
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from adapters.origin import FileOrigin
from harness.postgres import PostgresServer, postgres_bin
from harness.redis import RedisServer, redis_server_bin
from modelcast.config import ENV_WHEELHOUSE, TrackerConfig
from modelcast.runtime_index import compatible_platforms
from tracker.app import make_app

from .helpers import (CI_SPEC, PLATFORM, PYTHON, S3_ENV, TOKEN, WHEELS, Built, NodeProcess, ServiceProcess,
                      build_artifact, free_port, make_model, publish, run_cli, start_node, start_tracker,
                      wheelhouse_dir)

# -- S3 ----------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A real S3-compatible server (moto in server mode) as a separate process."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    moto = ServiceProcess([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                          health_url=url + "/moto-api/", log_path=tmp_path_factory.mktemp("moto") / "moto.log",
                          env=S3_ENV, name="moto server")
    moto.start()
    saved = {k: os.environ.get(k) for k in S3_ENV}
    os.environ.update(S3_ENV)
    yield url
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    moto.stop()


@pytest.fixture
def s3_bucket(s3_server):
    """A fresh bucket on the S3 server; yields (endpoint_url, bucket)."""
    import boto3

    name = f"mc-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_server, **_boto_kwargs()).create_bucket(Bucket=name)
    return s3_server, name


def _boto_kwargs() -> dict:
    return {"aws_access_key_id": S3_ENV["AWS_ACCESS_KEY_ID"], "aws_secret_access_key": S3_ENV["AWS_SECRET_ACCESS_KEY"],
            "region_name": S3_ENV["AWS_DEFAULT_REGION"]}


# -- PostgreSQL --------------------------------------------------------------------------

NO_POSTGRES = ("PostgreSQL is not installed (Debian package postgresql, its initdb and pg_ctl in "
               "/usr/lib/postgresql/*/bin; `make system-tools` installs it as root)")


@pytest.fixture(scope="session")
def postgres():
    """A real PostgreSQL server of the tests' own (initdb + pg_ctl in a temporary directory, a free port)."""
    if postgres_bin() is None:
        pytest.skip(NO_POSTGRES)
    server = PostgresServer().start()
    yield server
    server.close()


@pytest.fixture
def postgres_db(postgres):
    """The URL of a fresh, empty database on :func:`postgres`; dropped after the test."""
    name = f"t_{uuid.uuid4().hex[:16]}"
    url = postgres.create_database(name)
    yield url
    postgres.drop_database(name)


def pytest_generate_tests(metafunc):
    """A module marked ``pytest.mark.stores("sqlite", "postgresql")`` runs its registry tests on each store."""
    marker = metafunc.definition.get_closest_marker("stores")
    if marker is not None and "registry_db" in metafunc.fixturenames:
        metafunc.parametrize("registry_db", marker.args, indirect=True)


@pytest.fixture
def registry_db(request):
    """The ``cfg`` fixture's database: None (SQLite in its data directory) or a fresh PostgreSQL database's URL."""
    if getattr(request, "param", "sqlite") == "sqlite":
        yield None
    else:
        yield request.getfixturevalue("postgres_db")


# -- Redis -------------------------------------------------------------------------------

NO_REDIS = "redis-server is not installed (Debian package redis-server; `make system-tools` installs it as root)"


@pytest.fixture(scope="session")
def redis_server():
    """A real redis-server of the tests' own (a free port, a temporary directory, no persistence)."""
    if redis_server_bin() is None:
        pytest.skip(NO_REDIS)
    server = RedisServer().start()
    yield server
    server.close()


@pytest.fixture
def redis_url(redis_server):
    """The URL of :func:`redis_server`, emptied for this test."""
    import redis

    client = redis.Redis.from_url(redis_server.url)
    client.flushall()
    client.close()
    return redis_server.url


@pytest.fixture(params=["memory", "redis"])
def make_swarms(request):
    """Make a swarm store of each kind (``make_swarms(rng, zone_gateways=...)``), with one synchronous face."""
    from tests.swarm_stores import make_store

    url = request.getfixturevalue("redis_url") if request.param == "redis" else None
    made = []

    def make(rng=None, zone_gateways=-1):
        store = make_store(request.param, url, rng, zone_gateways)
        made.append(store)
        return store

    yield make
    for store in made:
        if hasattr(store, "close"):
            store.close()


# -- processes ---------------------------------------------------------------------------


@pytest.fixture
def tracker(tmp_path, request):
    """A registry + tracker process on 127.0.0.1 with token 'secret'; yields it (``.url``).

    A test that uses the S3 server gets a registry that allows its endpoint.
    """
    extra = []
    if {"s3_server", "s3_bucket"} & set(request.fixturenames):
        extra = ["--allow-s3-endpoint", request.getfixturevalue("s3_server")]
    svc = start_tracker(tmp_path, token=TOKEN, env=S3_ENV, extra=extra)
    yield svc
    svc.stop()


@pytest.fixture
def node_factory(tmp_path):
    """Start real node daemons (``start(registry, name, *flags, host=..., zone=...)``); all stopped at the end."""
    started: list[NodeProcess] = []

    def start(registry: str, name: str, *extra: str, host: str = "127.0.0.1", zone: str = "default") -> NodeProcess:
        svc = start_node(tmp_path, registry, name, host=host, zone=zone, extra=extra)
        started.append(svc)
        return svc

    yield start
    for svc in started:
        svc.stop()


# -- the registry as an in-process aiohttp app ---------------------------------------------


@pytest.fixture
def origin(tmp_path) -> FileOrigin:
    """A file origin in ``tmp_path/origin``."""
    return FileOrigin(tmp_path / "origin")


@pytest.fixture
def cfg(tmp_path, registry_db) -> TrackerConfig:
    """The registry's config for the ``client`` fixture: write token 'secret', a 60 s peer TTL.

    Its database is SQLite unless the module is marked to run on PostgreSQL too (``registry_db``).

    The test client (127.0.0.1) is a trusted proxy, so its ``ip=`` lists the peers it
    simulates; tests/security/test_peer_entries.py checks what an untrusted client gets.
    """
    return TrackerConfig(data_dir=tmp_path / "registry", db=registry_db, token=TOKEN, peer_ttl_s=60,
                         trusted_proxies=("127.0.0.1",))


@pytest.fixture
async def client(aiohttp_client, cfg):
    """An aiohttp test client of the registry app, served on this test's event loop."""
    return await aiohttp_client(make_app(cfg))


@pytest.fixture
def art(tmp_path) -> Built:
    """The default test artifact ``demo/model`` (two files, hybrid torrent), not yet published."""
    return build_artifact(tmp_path)


# -- runtime layers ------------------------------------------------------------------------
#
# The wheelhouse (``$MODELCAST_WHEELHOUSE``, default ``~/.cache/modelcast/wheelhouse``) holds
# onnxruntime, onnxruntime-gpu and onnxruntime-cann with their dependencies for CPython 3.11
# on manylinux_2_28_x86_64: about 325 MB, downloaded once, then every build is offline.


@pytest.fixture(scope="session")
def wheelhouse() -> Path:
    """The cached wheelhouse; downloaded (with dependencies, for the target platform) only once."""
    where = wheelhouse_dir()
    key = hashlib.sha256(repr((WHEELS, PLATFORM, PYTHON)).encode()).hexdigest()[:16]
    done = where / f".complete-{key}"
    if not done.exists():
        where.mkdir(parents=True, exist_ok=True)
        platforms = [arg for tag in compatible_platforms(PLATFORM) for arg in ("--platform", tag)]
        out = subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--disable-pip-version-check",
                              "-d", str(where), "--only-binary=:all:", *platforms, "--python-version", PYTHON,
                              "--implementation", "cp", *WHEELS], capture_output=True, text=True, timeout=1800)
        if out.returncode != 0:
            pytest.fail(f"could not download the test wheelhouse into {where} (needs PyPI once; or set "
                        f"{ENV_WHEELHOUSE} to a directory holding {', '.join(WHEELS)} and their dependencies): "
                        f"{out.stderr.strip()[-1500:]}")
        done.write_text("\n".join(WHEELS) + "\n")
    return where


class BuiltRuntime:
    """A registry holding ort:1.31.1 built from the CI spec, and the kept layer artifacts."""

    def __init__(self, registry: str, origin: str, out: Path, index_digest: str, build_output: str,
                 tmp: Path, seconds: float):
        self.registry, self.origin, self.out = registry, origin, out
        self.index_digest, self.build_output, self.tmp, self.seconds = index_digest, build_output, tmp, seconds
        self.ref = "ort:1.31.1"


@pytest.fixture(scope="module")
def built_runtime(wheelhouse, tmp_path_factory):
    """A registry process and ``modelcast runtime build`` of the CI spec (cpu, cuda13, cann8.0) into it."""
    tmp = tmp_path_factory.mktemp("runtime")
    svc = start_tracker(tmp, token=TOKEN, env=S3_ENV)
    registry = svc.url
    origin = (tmp / "origin").as_uri()
    t0 = time.monotonic()
    out = run_cli("runtime", "build", str(CI_SPEC), "--registry", registry, "--origin", origin, "--token", TOKEN,
                  "--wheelhouse", str(wheelhouse), "--out", str(tmp / "layers"), timeout=600)
    seconds = time.monotonic() - t0
    if out.returncode != 0:
        svc.stop()
        pytest.fail(f"runtime build failed: {out.stderr}")
    print(out.stdout, f"build of 3 variants took {seconds:.1f} s", sep="\n")
    try:
        yield BuiltRuntime(registry, origin, tmp / "layers", out.stdout.strip().splitlines()[-1], out.stdout, tmp,
                           seconds)
    finally:
        svc.stop()


# -- Ray without modelcast labels ------------------------------------------------------------


class PlainRay:
    """A one-node Ray started by ``ray.init()`` with only the plugin's environment set."""

    def __init__(self, registry: str, node_url: str, model_ref: str, model_digest: str, env: dict[str, str]):
        self.registry, self.node_url, self.model_ref, self.model_digest, self.env = \
            registry, node_url, model_ref, model_digest, env


@pytest.fixture(scope="module")
def plain_ray(tmp_path_factory):
    """A registry, a node daemon and a local ``ray.init(num_cpus=2)`` whose node has no modelcast
    labels: the plugin's variables come from ``modelcast ray start --dry-run``, as the README says."""
    ray = pytest.importorskip("ray")
    from ray import serve

    tmp = tmp_path_factory.mktemp("plain-ray")
    registry = start_tracker(tmp, token=TOKEN)
    node = start_node(tmp, registry.url, "node-0", token=TOKEN)
    saved = dict(os.environ)
    try:
        ref = "plain/model:v1"
        digest = publish(registry.url, make_model(tmp / "model", {"weights.bin": 300_000, "config.json": 20}), ref,
                         (tmp / "origin").as_uri())
        plan = run_cli("ray", "start", "--dry-run", "--node", node.url)
        assert plan.returncode == 0, plan.stderr
        env = dict(shlex.split(line[len("export "):])[0].split("=", 1) for line in plan.stdout.splitlines()
                   if line.startswith("export "))
        os.environ.update(env)  # the raylet that ray.init starts inherits them
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        serve.start(http_options={"host": "127.0.0.1", "port": free_port()})
        yield PlainRay(registry.url, node.url, ref, digest, env)
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
            os.environ.clear()
            os.environ.update(saved)
            node.stop()
            registry.stop()
