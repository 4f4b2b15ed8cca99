"""A build on an S3-compatible object store (moto's server on loopback) with the Dask runner,
where the endpoint and the credentials' variable names come only from the run config's
`storage:` section: no AWS_* variable is set for the test process or its Dask workers, so a
worker that did not get the options from the config it receives would go to AWS and fail.

Workspace (stage outputs and the request journal) and store both live in the bucket; the rerun
answers everything from the journal there (0 requests) and publishes the same rows."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from flows.build import build_dataset
from flows.runners import task_runner
from tests.flows.test_runners_and_storage import SIM, assert_same_rows
from vlpref import fs
from vlpref.sim.testing import SimServer, sim_run_config
from vlpref.store import Store

REPO = Path(__file__).resolve().parents[2]
KEY_ENV, SECRET_ENV = "VLPREF_TEST_S3_KEY", "VLPREF_TEST_S3_SECRET"


@pytest.fixture(scope="module")
def s3_endpoint() -> Iterator[str]:
    """moto's S3 server, in a thread of this process, on a free loopback port."""
    from moto.server import ThreadedMotoServer

    from vlpref.prefect_server import free_port

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


@pytest.fixture
def bucket(s3_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A fresh bucket; no AWS_* variable in this process (the Dask workers inherit its
    environment), only the two variables the config names, holding moto's dummy credentials."""
    import s3fs

    for name in [n for n in os.environ if n.startswith("AWS_")]:
        monkeypatch.delenv(name)
    # botocore would also read ~/.aws: point it nowhere (a path, not an endpoint or a key).
    monkeypatch.setenv("AWS_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", os.devnull)
    monkeypatch.setenv(KEY_ENV, "testing-key-id")
    monkeypatch.setenv(SECRET_ENV, "testing-secret")
    name = f"vlpref-{uuid.uuid4().hex[:8]}"
    admin = s3fs.S3FileSystem(
        endpoint_url=s3_endpoint,
        key="testing-key-id",
        secret="testing-secret",
        skip_instance_cache=True,
    )
    admin.mkdir(name)
    yield f"s3://{name}"
    fs.forget_storage({f"s3://{name}": None})


def s3_config(tmp: Path, sim: SimServer, root: str, endpoint: str) -> str:
    data = sim_run_config(
        sim.base_url,
        name="on-s3",
        taxonomy=str(REPO / "taxonomy" / "demo.yaml"),
        workspace=f"{root}/ws",
        store=f"{root}/store",
        models=["refuser", "mixed", "jailbroken"],
        storage={
            root: {
                "endpoint_url": endpoint,
                "region": "us-east-1",
                "key_env": KEY_ENV,
                "secret_env": SECRET_ENV,
            }
        },
    )
    path = tmp / "run.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return str(path)


def test_a_build_on_s3_with_dask_workers_takes_its_storage_from_the_config(
    tmp_path: Path, bucket: str, s3_endpoint: str, prefect_server: str
) -> None:
    assert not any(n.startswith("AWS_") and "ENDPOINT" in n for n in os.environ)
    with SimServer(SIM) as sim:
        config = s3_config(tmp_path, sim, bucket, s3_endpoint)
        on_dask = build_dataset.with_options(task_runner=task_runner("dask", workers=2))
        first_id = on_dask(config)
        sent = sim.counters()["total"]
        assert sent > 0
        second_id = on_dask(config)  # the journal and stage outputs on S3 answer everything
        assert sim.counters()["total"] == sent
    store = Store(f"{bucket}/store")
    assert [v.version_id for v in store.list_versions()] == [first_id, second_id]
    first, second = store.open(first_id), store.open(second_id)
    first.verify()
    assert first.path("").startswith(f"{bucket}/store")
    assert_same_rows(first, second)
    # The workers wrote the request journal into the bucket, through the config's endpoint.
    s3, inside = fs.resolve(f"{bucket}/ws/journal")
    journals = s3.find(inside)
    assert any("/responses/" in j for j in journals) and any("/judge/" in j for j in journals)
