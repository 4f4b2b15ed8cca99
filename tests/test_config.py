import textwrap
from pathlib import Path

import pytest

from vlpref.config import load_config
from vlpref.errors import ConfigError
from vlpref.resources import TAXONOMY_DIR

GOOD = """\
name: demo
taxonomy: taxonomy.yaml
workspace: work
endpoints:
  sim:
    kind: openai
    base_url: http://127.0.0.1:9/v1
    concurrency: 8
  hosted:
    kind: openai
    base_url: https://api.example.com/v1
    api_key_env: EXAMPLE_API_KEY
    rpm: 500
models:
  - name: refuser
    endpoint: sim
    model: sim-refuser
    sampling: {temperature: 0.7, max_tokens: 128, n: 2}
  - name: hosted-model
    endpoint: hosted
    model: some-vlm
generator: {name: gen, endpoint: sim, model: sim-judge}
judges:
  - name: judge
    endpoint: sim
    model: sim-judge
    sampling: {temperature: 0, logprobs: true, top_logprobs: 5}
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(textwrap.dedent(text))
    return path


# What `vlpref check` needs besides GOOD itself: the key variable of its `hosted` endpoint.
GOOD_ENV = {"EXAMPLE_API_KEY": "not-a-real-key"}


def write_good(tmp_path: Path, text: str = GOOD) -> Path:
    """GOOD (or `text`) as tmp_path/run.yaml, with the taxonomy.yaml it names beside it (the demo
    taxonomy), so that `vlpref check` finds everything a run needs."""
    (tmp_path / "taxonomy.yaml").write_text((TAXONOMY_DIR / "demo.yaml").read_text())
    return write(tmp_path, text)


def test_a_good_config_loads_with_paths_resolved(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, GOOD))
    assert [m.name for m in config.models] == ["refuser", "hosted-model"]
    assert config.models[0].sampling.to_params().n == 2
    assert config.taxonomy == str(tmp_path / "taxonomy.yaml")
    assert config.workspace == str(tmp_path / "work")
    assert config.store == str(tmp_path / ".vlpref/store")
    assert config.endpoint_kind("hosted") == "openai"
    assert config.stages.pairs.policy == "spa-vl"


@pytest.mark.parametrize("name", ["demo", "spa_vl"])
def test_a_builtin_taxonomy_is_the_shipped_file(tmp_path: Path, name: str) -> None:
    text = GOOD.replace("taxonomy: taxonomy.yaml", f"taxonomy: builtin:{name}")
    config = load_config(write(tmp_path, text))
    assert config.taxonomy == str(TAXONOMY_DIR / f"{name}.yaml")
    assert Path(config.taxonomy).is_file()


def test_config_hash_ignores_where_files_live(tmp_path: Path) -> None:
    a = load_config(write(tmp_path, GOOD))
    b = load_config(write(tmp_path, GOOD.replace("workspace: work", "workspace: elsewhere")))
    c = load_config(write(tmp_path, GOOD.replace("n: 2", "n: 3")))
    assert a.content_hash() == b.content_hash() != c.content_hash()


def test_config_hash_ignores_how_many_branches_run_at_once(tmp_path: Path) -> None:
    a = load_config(write(tmp_path, GOOD))
    b = load_config(write(tmp_path, GOOD + "parallel_branches: 2\nresponses_in_flight: 500\n"))
    assert (b.parallel_branches, b.responses_in_flight) == (2, 500)
    assert (a.parallel_branches, a.responses_in_flight) == (4, 8000)
    assert a.content_hash() == b.content_hash()


@pytest.mark.parametrize(
    ("change", "field", "line", "expected"),
    [
        (("concurrency: 8", "concurency: 8"), "endpoints.sim.concurency", 8, "unknown field"),
        (("concurrency: 8", "concurrency: many"), "endpoints.sim.concurrency", 8, "valid integer"),
        (
            ("base_url: http://127.0.0.1:9/v1", "base_url: ftp://x"),
            "endpoints.sim.base_url",
            7,
            "http",
        ),
        (("n: 2}", "n: 0}"), "models[0].sampling.n", 18, "greater than or equal to 1"),
        (
            ("endpoint: hosted\n", "endpoint: nowhere\n"),
            "models[1].endpoint",
            20,
            "unknown endpoint 'nowhere'",
        ),
        (("name: hosted-model", "name: refuser"), "models[1].name", 19, "duplicate model name"),
        (
            ("kind: openai\n    base_url: https://api", "kind: nosuch\n    base_url: https://api"),
            "endpoints.hosted.kind",
            10,
            "no provider of kind 'nosuch'",
        ),
        (("name: demo\n", ""), "name", None, "required field is missing"),
        (
            ("workspace: work\n", "workspace: work\nresponses_in_flight: 0\n"),
            "responses_in_flight",
            4,
            "greater than or equal to 1",
        ),
        (
            ("taxonomy: taxonomy.yaml", "taxonomy: builtin:spa-vl"),
            "taxonomy",
            2,
            "unknown builtin taxonomy 'builtin:spa-vl' (builtin: builtin:demo, builtin:spa_vl)",
        ),
    ],
)
def test_errors_name_file_field_line_and_expectation(
    tmp_path: Path, change: tuple[str, str], field: str, line: int | None, expected: str
) -> None:
    assert change[0] in GOOD
    path = write(tmp_path, GOOD.replace(change[0], change[1], 1))
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert message.startswith(f"{path}: {field}: ")
    if line is not None:
        assert f"line {line}:" in message
    assert expected in message


def test_an_api_key_in_the_file_is_refused_without_echoing_it(tmp_path: Path) -> None:
    text = GOOD.replace("api_key_env: EXAMPLE_API_KEY", "api_key: sk-very-secret")
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, text))
    message = str(info.value)
    assert "endpoints.hosted.api_key" in message and "api_key_env" in message
    assert "sk-very-secret" not in message


def test_secret_headers_are_refused(tmp_path: Path) -> None:
    text = GOOD.replace("rpm: 500", "rpm: 500\n    headers: {Authorization: Bearer x}")
    with pytest.raises(ConfigError, match="api_key_env"):
        load_config(write(tmp_path, text))


def test_yaml_syntax_errors_give_the_line(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"run\.yaml: line \d+: invalid YAML"):
        load_config(write(tmp_path, "name: x\nmodels:\n  - [unclosed\n"))


def test_a_missing_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "absent.yaml")


def _judges_config(judges: list[dict[str, str]]) -> dict[str, object]:
    return {
        "name": "x",
        "taxonomy": "builtin:demo",
        "endpoints": {"e": {"kind": "openai", "base_url": "http://127.0.0.1:9/v1"}},
        "models": [{"name": "a", "endpoint": "e", "model": "m"}],
        "generator": {"name": "g", "endpoint": "e", "model": "m"},
        "judges": judges,
    }


def test_a_second_judge_needs_a_first_pass_and_exports_need_distinct_folders() -> None:
    from vlpref.config import parse_config

    second = {"name": "strong", "endpoint": "e", "model": "m", "tier": "second"}
    with pytest.raises(ConfigError, match=r"judges\[0\]\.tier: a `tier: second` judge needs"):
        parse_config(_judges_config([second]))
    first = {"name": "small", "endpoint": "e", "model": "m"}
    assert parse_config(_judges_config([first, second])).judges[1].tier == "second"
    data = _judges_config([first])
    data["exports"] = {"formats": [{"format": "trl"}, {"format": "trl"}]}
    with pytest.raises(ConfigError, match=r"exports share folders \['trl'\]"):
        parse_config(data)


def test_an_image_generation_source_names_a_known_endpoint() -> None:
    """Found when the config loads, before any request (default source and overrides alike)."""
    from vlpref.config import parse_config

    data = _judges_config([{"name": "j", "endpoint": "e", "model": "m"}])
    data["stages"] = {"images": {"source": {"kind": "generate", "endpoint": "nope", "model": "i"}}}
    with pytest.raises(ConfigError, match=r"images\.source\.endpoint: unknown endpoint 'nope'"):
        parse_config(data)
    data["stages"] = {
        "images": {
            "source": {"kind": "typographic"},
            "overrides": {"Malicious Use": {"kind": "generate", "endpoint": "x", "model": "i"}},
        }
    }
    with pytest.raises(ConfigError, match=r"overrides\.Malicious Use\.endpoint: unknown endpoint"):
        parse_config(data)
    data["stages"] = {"images": {"source": {"kind": "generate", "endpoint": "e", "model": "i"}}}
    assert parse_config(data).stages.images.source.kind == "generate"
