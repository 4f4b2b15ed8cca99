import uuid
from pathlib import Path

import pytest

from vlpref.chat import Sample, SampleUsage, TokenLogprob, Usage
from vlpref.errors import JournalError
from vlpref.journal import Journal, JournalEntry


def entry(key: str, text: str = "hello", logprobs: bool = False) -> JournalEntry:
    lp = (TokenLogprob("safe", -0.1, (("safe", -0.1), ("unsafe", -2.3))),) if logprobs else None
    return JournalEntry(
        key=key,
        sample=Sample(0, text, "stop", lp),
        model="m",
        usage=Usage(10, 2),
        call_id="c1",
        latency_s=0.05,
        created=1.0,
    )


def test_entries_survive_a_reopen_exactly(tmp_path: Path) -> None:
    with Journal(str(tmp_path / "j")) as journal:
        journal.append([entry("a", "é ünïcode\nnewline"), entry("b", logprobs=True)])
    reopened = Journal(str(tmp_path / "j"))
    assert len(reopened) == 2
    assert reopened.get("a") == entry("a", "é ünïcode\nnewline")
    assert reopened.get("b") == entry("b", logprobs=True)
    assert reopened.get("c") is None


def test_each_append_is_on_disk_before_close(tmp_path: Path) -> None:
    journal = Journal(str(tmp_path / "j"))
    journal.append([entry("a")])
    # A second reader sees it without close(): the line was flushed to the OS.
    assert "a" in Journal(str(tmp_path / "j"))
    journal.close()


def test_append_is_idempotent_per_key(tmp_path: Path) -> None:
    with Journal(str(tmp_path / "j")) as journal:
        journal.append([entry("a"), entry("a", "other")])
        journal.append([entry("a", "third")])
        assert journal.appended == 1
    lines = [ln for f in (tmp_path / "j").iterdir() for ln in f.read_text().splitlines()]
    assert len(lines) == 1


def test_each_writer_has_its_own_segment_and_first_answer_wins(tmp_path: Path) -> None:
    first, second = Journal(str(tmp_path / "j")), Journal(str(tmp_path / "j"))
    first.append([entry("a", "first"), entry("b")])
    second.append([entry("a", "second"), entry("c")])
    first.close()
    second.close()
    assert len(list((tmp_path / "j").iterdir())) == 2
    merged = Journal(str(tmp_path / "j"))
    assert sorted(merged.keys()) == ["a", "b", "c"]
    assert merged.get("a") is not None


def test_a_torn_last_line_is_skipped_and_counted(tmp_path: Path) -> None:
    with Journal(str(tmp_path / "j")) as journal:
        journal.append([entry("a"), entry("b")])
    segment = next((tmp_path / "j").iterdir())
    with segment.open("ab") as handle:
        handle.write(entry("c").to_json()[:25])  # the process died mid-write
    reopened = Journal(str(tmp_path / "j"))
    assert sorted(reopened.keys()) == ["a", "b"]
    assert reopened.torn_lines == 1


def test_corruption_inside_a_segment_names_the_file_and_line(tmp_path: Path) -> None:
    root = tmp_path / "j"
    root.mkdir()
    (root / "seg.jsonl").write_bytes(
        entry("a").to_json() + b"\n{garbage\n" + entry("b").to_json() + b"\n"
    )
    with pytest.raises(JournalError, match=r"seg\.jsonl: line 2"):
        Journal(str(root))


def test_object_store_filesystems_get_part_files() -> None:
    location = f"memory://journal-{uuid.uuid4().hex}"
    journal = Journal(location, flush_every=2)
    journal.append([entry("a")])
    assert len(Journal(location)) == 0  # buffered: object stores cannot append
    journal.append([entry("b"), entry("c")])
    assert len(Journal(location)) == 3  # flushed as one part
    journal.append([entry("d")])
    journal.close()
    reopened = Journal(location)
    assert sorted(reopened.keys()) == ["a", "b", "c", "d"]
    assert len(reopened.fs.ls(reopened.root)) == 2


def test_a_sample_share_survives_a_reopen(tmp_path: Path) -> None:
    share = SampleUsage("c1", 5, 2, True)
    shared = JournalEntry(
        key="a",
        sample=Sample(0, "hi", "stop", None, 2, share),
        model="m",
        usage=Usage(10, 4),
        call_id="c1",
        latency_s=0.05,
        created=1.0,
    )
    with Journal(str(tmp_path / "j")) as journal:
        journal.append([shared])
    again = Journal(str(tmp_path / "j")).get("a")
    assert again == shared and again.share == share


def test_a_line_from_before_shares_reads_as_its_whole_call_not_exact(tmp_path: Path) -> None:
    root = tmp_path / "j"
    root.mkdir()
    old = b'{"k":"a","i":1,"m":"m","x":"hi","f":"stop","u":[10,4],"c":"c1","l":0.1,"t":1.0}\n'
    (root / "old.jsonl").write_bytes(old)
    got = Journal(str(root)).get("a")
    assert got is not None and got.sample.usage is None and got.sample.completion_tokens is None
    assert got.share == SampleUsage("c1", 10, 4, False)
