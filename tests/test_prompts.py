"""Prompt templates: rendering, field checks that name the file, versions that follow the text."""

from __future__ import annotations

from pathlib import Path

import pytest

from vlpref.errors import ConfigError
from vlpref.prompts import PROMPT_NAMES, load_prompt, prompt_versions


def test_every_shipped_template_loads_and_renders() -> None:
    for name in PROMPT_NAMES:
        prompt = load_prompt(name)
        text = prompt.render(**{field: f"<{field}>" for field in prompt.fields})
        for field in prompt.fields:
            assert f"<{field}>" in text


def test_render_refuses_missing_and_unexpected_fields_naming_the_file(tmp_path: Path) -> None:
    (tmp_path / "response.txt").write_text('Q: $question\nJSON stays: {"a": 1}\n')
    prompt = load_prompt("response", tmp_path)
    assert prompt.render(question="why?") == 'Q: why?\nJSON stays: {"a": 1}\n'
    with pytest.raises(ConfigError, match="missing \\['question'\\]") as missing:
        prompt.render()
    assert str(tmp_path / "response.txt") in str(missing.value)
    with pytest.raises(ConfigError, match="unexpected \\['image'\\]"):
        prompt.render(question="why?", image="x")
    # The same template renders the same way however often it is asked (fields are cached).
    assert prompt.render(question="a") == prompt.render(question="a")


def test_the_version_follows_the_text(tmp_path: Path) -> None:
    (tmp_path / "response.txt").write_text("Q: $question\n")
    before = load_prompt("response", tmp_path).version
    (tmp_path / "response.txt").write_text("Question: $question\n")
    after = load_prompt("response", tmp_path)
    assert after.version != before
    assert after.render(question="q") == "Question: q\n"


def test_an_invalid_template_is_an_error_naming_the_file(tmp_path: Path) -> None:
    (tmp_path / "caption.txt").write_text("a lone $ sign\n")
    with pytest.raises(ConfigError, match="invalid template") as err:
        load_prompt("caption", tmp_path)
    assert "caption.txt" in str(err.value)


def test_versions_cover_every_template() -> None:
    assert set(prompt_versions()) == set(PROMPT_NAMES)
