"""The retrieval source: a branch's images found by CLIP similarity to its key phrase and keywords,
as SPA-VL collected its images (LAION-5B, retrieved per subcategory, then filtered).

Per branch:

1. **Queries** (`build_queries`): the key phrase and/or the keywords (`queries`), each put into
   `query_template` (`{query}` is replaced, e.g. `a photo of {query}`); a term that repeats
   (case-insensitively) is asked once.
2. **Search**: each query asks for its `top_k` most similar images, from the embedded index
   (`index`, made by `vlpref index build`, vlpref/images/index.py) or a clip-retrieval KNN service
   (`service`, vlpref/images/knn_client.py).
3. **Selection** (`select_hits`): results under `min_similarity` are dropped; an image several
   queries found is kept once, under the query that scored it highest; then the queries take
   turns by rank (every query's best, then every query's second, ...) until `per_branch` images:
   each keyword contributes, rather than the one whose wording CLIP likes best.

Provenance in each image's `source_meta`: `retrieval` (`index` or `knn`), the query's text and
origin (`key_phrase` / `keyword`), its `score` (cosine similarity as the backend computed it),
the `rank` within the query, and where the image came from: `path` (relative to the pool root)
or `url` (as `safe_url` gives it), with the service's `caption` and `id` when it gave them.

Reading: an index image is read like a folder source's file, inside the pool root
(`read_local`); a service image is downloaded like a manifest URL (`fetch_url`): only from
addresses the source's `allow_private` / `allow_hosts` let through, redirects checked hop by
hop, the body capped at `max_bytes`. A query the service did not answer is a failure of the
branch (item `query:<text>`, kind as vlpref/retry.py knows it), so a rerun asks it again.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
from collections.abc import Coroutine, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vlpref.config import RetrievalSource
from vlpref.images.knn_client import KnnError, make_knn_client, query_knn
from vlpref.images.netguard import HostGuard
from vlpref.images.sources import LocalRoot, SourceItem, SourceListing, resolve_local
from vlpref.images.urls import safe_url
from vlpref.stage import FailureRow
from vlpref.taxonomy import Subcategory

__all__ = [
    "Hit",
    "Query",
    "build_queries",
    "list_retrieval",
    "retrieval_guard",
    "select_hits",
]

# The service sends at most this many queries of a branch at once.
_KNN_CONCURRENCY = 4


@dataclass(frozen=True)
class Query:
    text: str  # as sent: the template applied
    origin: str  # key_phrase | keyword
    term: str  # the taxonomy's words


@dataclass(frozen=True)
class Hit:
    """One result of one query: `key` identifies the image across queries (its pool path or
    its URL); `path` xor `url` says where to read it."""

    query: int  # index into the branch's queries
    rank: int  # 0-based, within its query
    score: float
    key: str
    path: str | None = None
    url: str | None = None
    caption: str | None = None
    id: int | str | None = None


def build_queries(leaf: Subcategory, source: RetrievalSource) -> list[Query]:
    """The branch's queries, in taxonomy order, each term once (case-insensitively)."""
    terms: list[tuple[str, str]] = []
    if "key_phrase" in source.queries and leaf.key_phrase.strip():
        terms.append(("key_phrase", leaf.key_phrase.strip()))
    if "keywords" in source.queries:
        terms.extend(("keyword", k.strip()) for k in leaf.keywords if k.strip())
    seen: set[str] = set()
    queries: list[Query] = []
    for origin, term in terms:
        folded = term.casefold()
        if folded in seen:
            continue
        seen.add(folded)
        queries.append(Query(source.query_template.replace("{query}", term), origin, term))
    return queries


def select_hits(
    per_query: Sequence[Sequence[Hit]],
    *,
    top_k: int,
    per_branch: int,
    min_similarity: float | None,
) -> list[Hit]:
    """The images a branch keeps, in the order they are kept (module docstring, step 3)."""
    best: dict[str, Hit] = {}
    for hits in per_query:
        ranked = sorted(hits, key=lambda h: (-h.score, h.rank))[:top_k]
        for hit in ranked:
            if min_similarity is not None and hit.score < min_similarity:
                continue
            held = best.get(hit.key)
            if held is None or (hit.score, -hit.query) > (held.score, -held.query):
                best[hit.key] = hit
    # Each image under the query that scored it best; then the queries take turns by rank.
    lanes: list[list[Hit]] = [[] for _ in per_query]
    for hit in best.values():
        lanes[hit.query].append(hit)
    for lane in lanes:
        lane.sort(key=lambda h: (-h.score, h.rank))
    chosen: list[Hit] = []
    depth = 0
    while len(chosen) < per_branch and any(depth < len(lane) for lane in lanes):
        for lane in lanes:
            if depth < len(lane) and len(chosen) < per_branch:
                chosen.append(lane[depth])
        depth += 1
    return chosen


def retrieval_guard(source: RetrievalSource) -> HostGuard:
    """The address policy the service's image URLs are downloaded under."""
    return HostGuard(allow_private=source.allow_private, allow_hosts=source.allow_hosts)


def _meta(queries: Sequence[Query], hit: Hit, backend: str) -> dict[str, Any]:
    query = queries[hit.query]
    meta: dict[str, Any] = {
        "retrieval": backend,
        "query": query.text,
        "query_origin": query.origin,
        "score": round(hit.score, 6),
        "rank": hit.rank,
    }
    if hit.path is not None:
        meta["path"] = hit.path
    if hit.url is not None:
        meta["url"] = safe_url(hit.url)
    if hit.caption is not None:
        meta["caption"] = hit.caption[:1000]
    if hit.id is not None:
        meta["id"] = hit.id
    return meta


def list_retrieval(source: RetrievalSource, leaf: Subcategory, *, base_dir: Path) -> SourceListing:
    """What the retrieval source offers this branch (synchronous: the stage's own thread)."""
    queries = build_queries(leaf, source)
    if not queries:
        listing = SourceListing()
        listing.notes.append("no query: the branch has no key phrase or keywords to search for")
        return listing
    if source.service is not None:
        return _run_sync(_list_knn(source, queries))
    return _list_index(source, queries, base_dir)


def _run_sync(coro: Coroutine[Any, Any, SourceListing]) -> SourceListing:
    """asyncio.run, also from a thread that already runs an event loop (then in a worker)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(asyncio.run, coro).result()


# --------------------------------------------------------------------------- KNN service


async def _list_knn(source: RetrievalSource, queries: Sequence[Query]) -> SourceListing:
    service = source.service
    assert service is not None
    listing = SourceListing()
    gate = asyncio.Semaphore(_KNN_CONCURRENCY)

    async def ask(number: int, query: Query) -> list[Hit] | KnnError:
        async with gate:
            try:
                found = await query_knn(client, service, query.text, source.top_k)
            except KnnError as exc:
                return exc
        return [
            Hit(number, rank, h.similarity, h.url, url=h.url, caption=h.caption, id=h.id)
            for rank, h in enumerate(found)
        ]

    async with make_knn_client(service) as client:
        answers = await asyncio.gather(*(ask(i, q) for i, q in enumerate(queries)))
    per_query: list[list[Hit]] = []
    for query, answer in zip(queries, answers, strict=True):
        if isinstance(answer, KnnError):
            item = f"query:{query.text}"
            listing.failures.append(FailureRow(item, answer.kind, answer.reason, answer.attempts))
            per_query.append([])
        else:
            per_query.append(answer)
    chosen = select_hits(
        per_query,
        top_k=source.top_k,
        per_branch=source.per_branch,
        min_similarity=source.min_similarity,
    )
    for hit in chosen:
        assert hit.url is not None
        meta = {**_meta(queries, hit, "knn"), "indice_name": service.indice_name}
        listing.items.append(SourceItem(safe_url(hit.url), "retrieval", meta, url=hit.url))
    return listing


# --------------------------------------------------------------------------- embedded index


def _list_index(source: RetrievalSource, queries: Sequence[Query], base_dir: Path) -> SourceListing:
    from vlpref.images.index import open_index  # torch & co: only for an embedded index

    assert source.index is not None
    index_dir = resolve_local(source.index, base_dir, what="retrieval index")
    model_dir = (
        resolve_local(source.model, base_dir, what="retrieval model") if source.model else None
    )
    index = open_index(index_dir, model_dir)
    if source.root is not None:
        pool = resolve_local(source.root, base_dir, what="retrieval root")
    else:
        pool = index.root
    root = LocalRoot.of(pool)
    results = index.search([q.text for q in queries], source.top_k)
    per_query = [
        [
            Hit(number, rank, score, str(row["path"]), path=str(row["path"]))
            for rank, (row, score) in enumerate(found)
        ]
        for number, found in enumerate(results)
    ]
    chosen = select_hits(
        per_query,
        top_k=source.top_k,
        per_branch=source.per_branch,
        min_similarity=source.min_similarity,
    )
    listing = SourceListing(root=root)
    for hit in chosen:
        assert hit.path is not None
        meta = {**_meta(queries, hit, "index"), "index": index_dir.name}
        listing.items.append(SourceItem(hit.path, "retrieval", meta, path=pool / hit.path))
    return listing
