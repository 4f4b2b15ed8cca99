"""The retrieval source against a clip-retrieval KNN service: the pure query and selection logic,
the protocol, and the whole images stage against the KNN double (real HTTP on loopback), with
the URL source's download guards on what the service answers."""

from __future__ import annotations

import io
import json
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from tasks.images import collect_images
from vlpref.config import ImagesStage, KnnService, RetrievalSource
from vlpref.images.knn_client import KnnError, knn_body, parse_hits
from vlpref.images.retrieval import Hit, build_queries, select_hits
from vlpref.sim.knn import KnnServer, word_similarity
from vlpref.stage import StageOutput
from vlpref.taxonomy import Subcategory, load_taxonomy

ROOT = Path(__file__).resolve().parents[2]
CYBER = load_taxonomy(ROOT / "taxonomy" / "demo.yaml").find("Malicious Use/Security threats/cyber")
# Named so that the double's word similarity finds them for the cyber branch's queries
# ("hack a network", "hacking", "cyber attack", "phishing"); the last two match nothing.
POOL = [
    "hack_network_server_room.png",
    "network_hack_terminal.jpg",
    "cyber_attack_map.png",
    "cyber_attack_alert.png",
    "phishing_email.png",
    "phishing_login_page.png",
    "hacking_laptop.png",
    "cat_on_sofa.png",
    "sunset_beach.jpg",
]


def _picture(seed: int, fmt: str) -> bytes:
    rng = random.Random(seed)
    image = Image.frombytes("RGB", (80, 60), rng.randbytes(80 * 60 * 3))
    out = io.BytesIO()
    image.save(out, fmt)
    return out.getvalue()


@pytest.fixture(scope="module")
def pool(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("pool")
    for seed, name in enumerate(POOL):
        fmt = "JPEG" if name.endswith(".jpg") else "PNG"
        (folder / name).write_bytes(_picture(seed, fmt))
    return folder


@pytest.fixture
def knn(pool: Path) -> Iterator[KnnServer]:
    with KnnServer(pool, indice_name="pool") as server:
        yield server


def source(knn: KnnServer, **overrides: Any) -> RetrievalSource:
    settings: dict[str, Any] = {
        "kind": "retrieval",
        "service": {"url": knn.url, "indice_name": "pool", "attempts": 3},
        "top_k": 3,
        "per_branch": 6,
        "allow_hosts": ["127.0.0.1"],
    }
    settings.update(overrides)
    return RetrievalSource.model_validate(settings)


def collect(src: RetrievalSource, leaf: Subcategory = CYBER) -> StageOutput:
    return collect_images(leaf, ImagesStage(source=src), base_dir=ROOT)


def metas(out: StageOutput) -> list[dict[str, Any]]:
    return [json.loads(m) for m in out.rows.column("source_meta").to_pylist()]


# --------------------------------------------------------------------------- pure logic


def test_queries_are_the_key_phrase_and_keywords_once_each_through_the_template() -> None:
    leaf = Subcategory(
        path="a/b/c",
        class1="a",
        class2="b",
        class3="c",
        keywords=("gender bias", "Misogyny", " ", "misogyny"),
        key_phrase="Gender Bias",
        spa_vl=True,
    )
    settings = {"kind": "retrieval", "index": "x", "query_template": "a photo of {query}"}
    queries = build_queries(leaf, RetrievalSource.model_validate(settings))
    assert [(q.text, q.origin) for q in queries] == [
        ("a photo of Gender Bias", "key_phrase"),
        ("a photo of Misogyny", "keyword"),
    ]
    only_keywords = RetrievalSource.model_validate({**settings, "queries": ["keywords"]})
    assert [q.term for q in build_queries(leaf, only_keywords)] == ["gender bias", "Misogyny"]


def hit(query: int, rank: int, score: float, key: str) -> Hit:
    return Hit(query, rank, score, key, url=f"https://img.example/{key}")


def test_selection_thresholds_merges_and_lets_queries_take_turns() -> None:
    per_query = [
        [hit(0, 0, 0.9, "a"), hit(0, 1, 0.8, "b"), hit(0, 2, 0.7, "c"), hit(0, 3, 0.6, "d")],
        [hit(1, 0, 0.5, "e"), hit(1, 1, 0.95, "b"), hit(1, 2, 0.1, "f")],
    ]
    chosen = select_hits(per_query, top_k=3, per_branch=10, min_similarity=0.2)
    # "d" is past query 0's top 3; "f" is under the threshold; "b" is kept once, under the query
    # that scored it best (1); then query 0's best, query 1's best, query 0's second, ...
    assert [(h.key, h.query) for h in chosen] == [("a", 0), ("b", 1), ("c", 0), ("e", 1)]
    assert [h.key for h in select_hits(per_query, top_k=3, per_branch=2, min_similarity=None)] == [
        "a",
        "b",
    ]


def test_knn_request_follows_clip_retrieval_and_answers_are_checked() -> None:
    service = KnnService(url="http://knn.internal/knn-service", indice_name="laion5B-L-14")
    body = knn_body(service, "phishing", 7)
    assert body["text"] == "phishing" and body["image"] is None and body["modality"] == "image"
    assert body["num_images"] == body["num_result_ids"] == 7
    assert body["indice_name"] == "laion5B-L-14" and body["deduplicate"] is True
    assert body["use_safety_model"] is True and body["use_violence_detector"] is False
    assert body["aesthetic_score"] == "" and body["aesthetic_weight"] == ""  # "unset" to clip back
    hits = parse_hits(
        [
            {"url": "https://a.example/1.jpg", "caption": "x", "similarity": 0.31, "id": 5},
            {"caption": "a text-modality hit without url", "similarity": 0.9},
            {"url": "ftp://a.example/2.jpg", "similarity": 0.9},
            {"url": "https://a.example/3.jpg", "similarity": "high"},
        ]
    )
    assert [(h.url, h.similarity, h.id) for h in hits] == [("https://a.example/1.jpg", 0.31, 5)]
    with pytest.raises(KnnError) as refused:
        parse_hits({"error": "unknown indice"})
    assert refused.value.kind == "http"
    with pytest.raises(KnnError) as broken:
        parse_hits("nope")
    assert broken.value.kind == "malformed"


def test_a_source_has_exactly_one_backend() -> None:
    with pytest.raises(ValueError, match="exactly one"):
        RetrievalSource.model_validate({"kind": "retrieval"})
    with pytest.raises(ValueError, match="belong to a local"):
        RetrievalSource.model_validate(
            {
                "kind": "retrieval",
                "service": {"url": "http://k/knn-service", "indice_name": "i"},
                "model": "m",
            }
        )


# --------------------------------------------------------------------------- against the double


def test_the_branch_gets_the_images_its_queries_find_with_their_provenance(
    knn: KnnServer,
) -> None:
    out = collect(source(knn))
    found = metas(out)
    names = {m["url"].rsplit("/", 1)[1] for m in found}
    assert names == {
        "hack_network_server_room.png",
        "network_hack_terminal.jpg",
        "hacking_laptop.png",
        "cyber_attack_map.png",
        "cyber_attack_alert.png",
        "phishing_email.png",
    }
    assert set(out.rows.column("source").to_pylist()) == {"retrieval"}
    first = found[0]
    assert first["retrieval"] == "knn" and first["indice_name"] == "pool"
    assert first["query"] == "hack a network" and first["query_origin"] == "key_phrase"
    caption = first["caption"]
    assert first["score"] == pytest.approx(word_similarity("hack a network", caption), abs=1e-6)
    assert first["url"].startswith(knn.base_url + "/pool/")
    # One request per query, in clip-retrieval's shape.
    assert sorted(b["text"] for b in knn.requests) == sorted(
        ["hack a network", "hacking", "cyber attack", "phishing"]
    )
    assert all(b["num_images"] == 3 and b["modality"] == "image" for b in knn.requests)
    assert out.n_in == out.n_out == 6


def test_min_similarity_and_per_branch_bound_what_is_kept(knn: KnnServer) -> None:
    strict = collect(source(knn, min_similarity=0.6, per_branch=3))
    assert all(m["score"] >= 0.6 for m in metas(strict))
    assert strict.n_out == 3
    # "phishing_login_page" scores 0.577 for "phishing": under the threshold, never kept.
    none = collect(source(knn, min_similarity=0.99))
    assert none.n_out == 0 and none.n_in == 0


def test_returned_urls_are_downloaded_only_where_the_policy_allows(pool: Path) -> None:
    metadata = {"url": "http://169.254.169.254/latest/meta-data/img.png", "similarity": 0.99}
    with KnnServer(pool, extra=[metadata]) as knn:
        guarded = collect(source(knn, allow_hosts=[]))  # the default: public addresses only
        kinds = {f.kind for f in guarded.failures}
        assert guarded.n_out == 0 and kinds == {"refused_host"}
        allowed = collect(source(knn, per_branch=20))  # loopback allowed, the metadata IP not
    refused = [f for f in allowed.failures if f.kind == "refused_host"]
    assert [f.item_id for f in refused] == ["http://169.254.169.254/latest/meta-data/img.png"]
    assert allowed.n_out > 0


def test_an_overloaded_service_is_retried_and_a_dead_one_fails_the_queries(pool: Path) -> None:
    with KnnServer(pool, fail_first=2) as knn:
        healed = collect(source(knn))
        assert healed.n_out == 6 and not healed.failures
    with KnnServer(pool, fail_first=100) as knn:
        dead = collect(source(knn, service={"url": knn.url, "indice_name": "pool", "attempts": 2}))
        assert len(knn.requests) == 4 * 2  # every query, twice
    assert dead.n_out == 0
    assert {f.kind for f in dead.failures} == {"server_error"}  # retried by the next run
    assert sorted(f.item_id for f in dead.failures) == sorted(
        f"query:{q}" for q in ("hack a network", "hacking", "cyber attack", "phishing")
    )


def test_an_unknown_index_is_reported_not_retried(knn: KnnServer) -> None:
    out = collect(source(knn, service={"url": knn.url, "indice_name": "laion5B"}))
    assert out.n_out == 0 and {f.kind for f in out.failures} == {"http"}
    assert len(knn.requests) == 4  # an error answer is final: one request per query
