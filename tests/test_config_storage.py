"""The run config's `storage:` section (vlpref/config.py: StorageLocation, vlpref/fs.py): fsspec
options by URL prefix, credentials only as the names of environment variables read where a
filesystem is opened, and options that reach a process which receives the config pickled (a Dask
or Ray worker). And a config read from a URI (shared storage) through fsspec.

The end-to-end test on an S3 server with the Dask runner is tests/flows/test_s3_storage.py."""

from __future__ import annotations

import pickle
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import fsspec
import pytest

from tests.test_config import GOOD, write
from tests.test_config_secrets import KEYS
from vlpref import fs
from vlpref.config import load_config
from vlpref.errors import ConfigError
from vlpref.resources import TAXONOMY_DIR

REPO = Path(__file__).resolve().parents[1]
STORAGE = """\
storage:
  s3://team-data:
    endpoint_url: http://minio.internal:9000
    region: eu-central-1
    key_env: TEAM_S3_KEY
    secret_env: TEAM_S3_SECRET
  s3://team-data/public:
    anon: true
"""


@pytest.fixture(autouse=True)
def no_storage_left() -> Iterator[None]:
    """Each test starts and ends with no registered options (they are per process)."""
    fs.forget_storage()
    yield
    fs.forget_storage()


def refused(tmp_path: Path, text: str) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, text))
    return str(info.value)


def test_storage_options_open_the_locations_under_their_prefix(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = load_config(write(tmp_path, GOOD + STORAGE))
    assert set(config.storage.root) == {"s3://team-data", "s3://team-data/public"}
    monkeypatch.setenv("TEAM_S3_KEY", "id-from-env")
    monkeypatch.setenv("TEAM_S3_SECRET", "secret-from-env")
    opened, path = fs.resolve("s3://team-data/ws/journal")
    assert path == "team-data/ws/journal"
    assert opened.endpoint_url == "http://minio.internal:9000"
    assert (opened.key, opened.secret) == ("id-from-env", "secret-from-env")
    assert opened.client_kwargs == {"region_name": "eu-central-1"}
    # The longest prefix wins; a bucket whose name only starts like the prefix is not under it.
    public, _ = fs.resolve("s3://team-data/public/v1")
    assert public.anon is True and public.key is None
    other, _ = fs.resolve("s3://team-data-eu/x")
    assert other.endpoint_url is None and other.key is None


def test_a_credential_variable_missing_on_this_host_names_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    load_config(write(tmp_path, GOOD + STORAGE))
    monkeypatch.delenv("TEAM_S3_KEY", raising=False)
    with pytest.raises(ConfigError, match=r"storage: TEAM_S3_KEY is not set on .*key_env"):
        fs.resolve("s3://team-data/ws")


def test_storage_is_operational_not_part_of_the_dataset(tmp_path: Path) -> None:
    plain = load_config(write(tmp_path, GOOD))
    with_storage = load_config(write(tmp_path, GOOD + STORAGE))
    assert plain.content_hash() == with_storage.content_hash()


@pytest.mark.parametrize("key", KEYS)
@pytest.mark.parametrize("field", ["key_env", "secret_env", "token_env"])
def test_a_credential_written_where_its_variable_name_belongs_is_refused(
    tmp_path: Path, key: str, field: str
) -> None:
    text = GOOD + f"storage:\n  s3://team-data:\n    {field}: {key}\n"
    message = refused(tmp_path, text)
    assert f"storage.s3://team-data.{field}" in message
    assert "NAME of an environment variable" in message
    assert key not in message and key[:10] not in message


@pytest.mark.parametrize(
    ("entry", "expected"),
    [
        ("secret: abc", "named like a credential"),  # the project's rule: no credential fields
        ("options: {secret: abc}", "named like a credential"),
        ("options: {client_kwargs: {aws_secret_access_key: abc}}", "named like a credential"),
        ("key_env: TEAM_S3_KEY", "key_env and secret_env go together"),
        # The project's rule (a URL with a password is a secret) refuses it before the model.
        ("endpoint_url: http://me:pw@minio:9000", "(not shown)"),
        ("endpoint_url: http://me@minio:9000", "credentials in a URL are refused"),
        ("endpoint_url: minio:9000", "must start with http:// or https://"),
        ("bucket: x", "unknown field"),
    ],
)
def test_storage_entries_are_checked(tmp_path: Path, entry: str, expected: str) -> None:
    assert expected in refused(tmp_path, GOOD + f"storage:\n  s3://team-data:\n    {entry}\n")


@pytest.mark.parametrize(
    ("prefix", "entry", "expected"),
    [
        ("team-data", "anon: true", "expected a URL prefix"),
        ("s4://team-data", "anon: true", "unknown fsspec protocol 's4'"),
        ("gs://team-data", "region: eu", "the named fields are s3fs's"),
        ("s3://me@team-data", "anon: true", "credentials in a URL are refused"),
        # A password in the prefix is a secret by the project's rule; the field is redacted.
        ("s3://me:hunter2hunter2@team-data", "anon: true", "storage.s3://me:[REDACTED]@"),
    ],
)
def test_storage_prefixes_are_checked(
    tmp_path: Path, prefix: str, entry: str, expected: str
) -> None:
    message = refused(tmp_path, GOOD + f"storage:\n  {prefix}:\n    {entry}\n")
    assert expected in message and "hunter2" not in message


def test_other_backends_take_their_options_as_written(tmp_path: Path) -> None:
    text = GOOD + "storage:\n  gs://bucket:\n    options: {project: team, requester_pays: true}\n"
    config = load_config(write(tmp_path, text))
    assert config.storage.root["gs://bucket"].fsspec_options("gs") == {
        "project": "team",
        "requester_pays": True,
    }


def test_a_pickled_config_brings_its_storage_to_a_fresh_process(tmp_path: Path) -> None:
    """What a Dask or Ray worker does with a task's config: unpickle it, then open the store."""
    config = load_config(write(tmp_path, GOOD + STORAGE))
    blob = tmp_path / "config.pickle"
    blob.write_bytes(pickle.dumps(config))
    script = (
        "import pickle, sys\n"
        "from vlpref import fs\n"
        "assert fs.storage_for('s3://team-data/x') is None\n"
        f"pickle.loads(open({str(blob)!r}, 'rb').read())\n"
        "opened, _ = fs.resolve('s3://team-data/store')\n"
        "print(opened.endpoint_url, opened.key)\n"
    )
    env = {"PATH": "/usr/bin:/bin", "TEAM_S3_KEY": "worker-key", "TEAM_S3_SECRET": "s"}
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    # The worker's own variable: credentials never travel in the config.
    assert done.stdout.split() == ["http://minio.internal:9000", "worker-key"]


def test_a_config_is_read_from_a_uri_with_relative_locations_beside_it() -> None:
    root = f"memory://configs-{uuid.uuid4().hex[:8]}/team"
    with fsspec.open(f"{root}/runs/nightly.yaml", "w") as out:
        out.write(GOOD.replace("taxonomy: taxonomy.yaml", "taxonomy: ../taxonomy.yaml"))
    with fsspec.open(f"{root}/taxonomy.yaml", "w") as out:
        out.write((TAXONOMY_DIR / "demo.yaml").read_text())
    config = load_config(f"{root}/runs/nightly.yaml")
    assert config.taxonomy == f"{root}/taxonomy.yaml"
    assert config.workspace == f"{root}/runs/work"
    assert config.source_file == f"{root}/runs/nightly.yaml"
    from vlpref.taxonomy import load_taxonomy

    assert load_taxonomy(config.taxonomy).domains  # read through fsspec too


def test_a_file_uri_is_a_local_path(tmp_path: Path) -> None:
    path = write(tmp_path, GOOD)
    assert load_config(f"file://{path}") == load_config(path)


def test_a_missing_uri_config_says_so() -> None:
    with pytest.raises(ConfigError, match=r"memory://nowhere/run.yaml: cannot read: "):
        load_config("memory://nowhere/run.yaml")


def test_a_uri_config_names_its_prompts_by_an_absolute_local_path() -> None:
    location = f"memory://configs-{uuid.uuid4().hex[:8]}/run.yaml"
    with fsspec.open(location, "w") as out:
        out.write(GOOD + "prompts_dir: prompts\n")
    with pytest.raises(ConfigError, match=r"prompts_dir: .*absolute path"):
        load_config(location)
