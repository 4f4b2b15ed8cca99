"""The images stage for one branch: pick the source, load, normalise, deduplicate, account.

Accounting (unit: source items). `n_in` = items the source offered this branch (folder files,
manifest rows naming the branch, typographic variants) plus manifest rows that could not be
placed; `n_out` = unique normalised images (rows); every other item is a failure with a kind and a
reason. A duplicate (same `image_id` as an earlier item of the branch) is a failure of kind
`duplicate` naming the item it repeats: it went in and did not come out, so `n_in == n_out +
n_failed` stays exact, and `extra["duplicates"]` counts them for anyone who wants errors only.
Manifest rows of other branches are not this branch's input: `extra["skipped_rows"]`.

Screening, after loading and before any model sees an image: each loaded image is hashed
(`phash`) and run through the configured filters (vlpref/images/filters.py), in threads; then, in
source order, a filter's rejection is a failure of kind `filter_<name>` and an image within
`near_duplicate_distance` bits of one already kept is a `near_duplicate` naming it
(vlpref/images/dedupe.py). `extra` counts them (`near_duplicates`, `filtered` per filter) and
splits in/out/failed per source kind (`by_source`). docs/images.md has the why of each choice.

What is published names local files relative to the source's root and URLs as `safe_url` gives
them (item ids, `source_meta`, failure reasons): no absolute path, no credential. Local files are
read only inside the root, URLs fetched only where the source's `HostGuard` allows, and decoding
shares the process's pixel budget (`decode_pixel_budget`); see vlpref/images/.

The function is synchronous (it runs inside a Prefect task's worker thread); reading, downloading
and normalising run on one private event loop, CPU work in threads, with bounded concurrency.
Output order follows the source's order, whatever order downloads finish in.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import io
import json
import os
from collections import Counter
from collections.abc import Coroutine
from contextlib import AsyncExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from PIL import Image

from vlpref import stopping
from vlpref.config import (
    FolderSource,
    GenerateSource,
    ImageSource,
    ImagesStage,
    ManifestSource,
    RetrievalSource,
    RunConfig,
    TypographicSource,
)
from vlpref.errors import ConfigError
from vlpref.images.dedupe import HASH_BITS, HashIndex, phash
from vlpref.images.filters import (
    FILTER_ERROR,
    SCREEN_SIDE,
    FilterImage,
    Screening,
    build_filters,
    rejection_kind,
    screen,
)
from vlpref.images.generation import GeneratedItem, list_generated
from vlpref.images.netguard import HostGuard
from vlpref.images.normalize import (
    ImageRejected,
    NormalizedImage,
    NormalizeOptions,
    decode_budget,
    decode_cost,
    normalize_bytes,
    normalize_image,
)
from vlpref.images.retrieval import list_retrieval, retrieval_guard
from vlpref.images.sources import (
    Fetched,
    ImageClient,
    LocalRoot,
    SourceItem,
    SourceListing,
    fetch_url,
    list_folder,
    list_manifest,
    make_client,
    read_local,
    resolve_local,
    source_guard,
)
from vlpref.images.typographic import FONT_NAME, RENDERER, TypographicVariant, render, variants
from vlpref.images.urls import safe_url
from vlpref.records import IMAGES, table
from vlpref.service import ModelService
from vlpref.stage import FailureRow, StageOutput
from vlpref.taxonomy import Subcategory, Taxonomy

__all__ = [
    "SourceChoice",
    "check_overrides",
    "choose_source",
    "collect_images",
    "list_items",
    "source_key_parts",
]

STAGE = "images"
UNIT = "source items"
_T = TypeVar("_T")


@dataclass(frozen=True)
class SourceChoice:
    """The source a branch uses; `override` is the prefix that chose it (None: the default)."""

    source: ImageSource
    override: str | None
    exact: bool  # the override names this very branch


def choose_source(leaf: Subcategory, stage: ImagesStage) -> SourceChoice:
    """`stage.overrides` by longest matching taxonomy path prefix, else `stage.source`."""
    parts = _components(leaf.path)
    best: tuple[int, str] | None = None
    for key in stage.overrides:
        prefix = _components(key)
        if prefix == parts[: len(prefix)] and (best is None or len(prefix) > best[0]):
            best = (len(prefix), key)
    if best is None:
        return SourceChoice(stage.source, None, exact=False)
    return SourceChoice(stage.overrides[best[1]], best[1], exact=best[0] == len(parts))


def check_overrides(stage: ImagesStage, taxonomy: Taxonomy) -> None:
    """ConfigError for an override prefix that matches no subcategory; call once per run."""
    # Per branch, a mistyped prefix is indistinguishable from "not mine": it would go unnoticed.
    for key in stage.overrides:
        try:
            taxonomy.select([key])
        except ConfigError as exc:
            raise ConfigError(str(exc), field=f"stages.images.overrides[{key!r}]") from None


def list_items(
    choice: SourceChoice,
    leaf: Subcategory,
    *,
    base_dir: Path,
    run: RunConfig | None = None,
    service: ModelService | None = None,
) -> tuple[SourceListing, dict[int, TypographicVariant]]:
    """What the chosen source offers this branch (typographic variants by item index). The
    generate source asks its endpoint here (`run` names it; `service`: the process's model
    service by default), so its items come with their bytes."""
    source = choice.source
    if isinstance(source, FolderSource):
        flat = source.layout == "flat" or (source.layout == "auto" and choice.exact)
        return list_folder(source, leaf, base_dir=base_dir, flat=flat), {}
    if isinstance(source, ManifestSource):
        return list_manifest(source, leaf, base_dir=base_dir), {}
    if isinstance(source, RetrievalSource):
        return list_retrieval(source, leaf, base_dir=base_dir), {}
    if isinstance(source, GenerateSource):
        if run is None:
            raise ConfigError("the generate source needs the run config (its endpoint)")
        return list_generated(source, leaf, run, service)[0], {}
    listing = SourceListing()
    chosen: dict[int, TypographicVariant] = {}
    for variant in variants(leaf, source.per_branch):
        chosen[len(listing.items)] = variant
        meta = {
            "renderer": RENDERER,
            "text": variant.text,
            "layout": variant.layout,
            "palette": variant.palette.name,
            "offset": list(variant.offset),
            "variant": variant.index,
            "canvas": source.size,
            "font": FONT_NAME,
        }
        listing.items.append(SourceItem(f"typographic:{variant.index}", "typographic", meta))
    return listing, chosen


def source_key_parts(source: ImageSource, run: RunConfig, base_dir: Path) -> list[Any]:
    """What a source's images depend on beyond its own settings, for the stage key (empty for
    the sources whose keys predate this, so their keys stay as they were): a retrieval index's
    build (its `index.json`, rewritten by each build) and, for a generate source, the prompt
    template's version and the endpoint's kind and cache namespace (as model entries enter
    keys: never the endpoint's URL or credentials)."""
    if isinstance(source, RetrievalSource) and source.index is not None:
        meta = resolve_local(source.index, base_dir, what="retrieval index") / "index.json"
        found = meta.stat() if meta.is_file() else None
        return [["index", found.st_size, found.st_mtime_ns] if found else ["index", "missing"]]
    if isinstance(source, GenerateSource):
        from vlpref.prompts import load_prompt

        endpoint = run.endpoints.get(source.endpoint, {})
        return [
            [
                "generate",
                load_prompt(source.template, run.prompts_dir).version,
                endpoint.get("kind", "openai"),
                endpoint.get("cache_namespace", ""),
            ]
        ]
    return []


def collect_images(
    leaf: Subcategory,
    stage: ImagesStage,
    *,
    base_dir: Path,
    run: RunConfig | None = None,
    service: ModelService | None = None,
) -> StageOutput:
    """Collect, validate, normalise and deduplicate the images of one branch. `run` and
    `service`: for a generate source (its endpoint, journal and budget)."""
    choice = choose_source(leaf, stage)
    listing, typo = list_items(choice, leaf, base_dir=base_dir, run=run, service=service)
    canvas = choice.source.size if isinstance(choice.source, TypographicSource) else 0
    guard: HostGuard | None = None
    if isinstance(choice.source, ManifestSource):
        guard = source_guard(choice.source)
    elif isinstance(choice.source, RetrievalSource):
        guard = retrieval_guard(choice.source)
    loaded = _run(_load_all(listing, typo, canvas, stage, guard))
    screenings = _screen_all(loaded, stage)

    rows: list[dict[str, Any]] = []
    failures: list[FailureRow] = list(listing.failures)
    failed_sources: list[str] = [choice.source.kind] * len(listing.failures)
    first_seen: dict[str, str] = {}
    near = HashIndex()
    limit = stage.near_duplicate_distance
    for item, outcome, screened in zip(listing.items, loaded, screenings, strict=True):
        failure = _keep_or_fail(item, outcome, screened, first_seen, near, limit)
        if failure is not None:
            failures.append(failure)
            failed_sources.append(item.source)
            continue
        assert not isinstance(outcome, ImageRejected) and screened is not None
        image, meta = outcome
        first_seen[image.image_id] = item.item_id
        rows.append(_row(leaf, item, image, meta, screened))

    kinds = Counter(f.kind for f in failures)
    extra: dict[str, Any] = {
        "source": choice.source.kind,
        "override": choice.override,
        "duplicates": kinds.get("duplicate", 0),
        "near_duplicates": kinds.get(NEAR_DUPLICATE, 0),
        "skipped_rows": listing.skipped,
        "failed_by_kind": dict(sorted(kinds.items())),
        "by_source": _by_source([r["source"] for r in rows], failed_sources),
        "filtered": _filtered(failures),
    }
    if listing.notes:
        extra["notes"] = list(listing.notes)
    return StageOutput(
        stage=STAGE,
        branch_id=leaf.branch_id,
        unit=UNIT,
        n_in=len(listing.items) + len(listing.failures),
        rows=table(rows, IMAGES),
        failures=tuple(failures),
        extra=extra,
    )


# --------------------------------------------------------------------------- screening

NEAR_DUPLICATE = "near_duplicate"
# Rendered key phrases are near-copies by design: a branch's variants are one phrase in other
# palettes and placements (to the hash, the same picture: 216 variants fall to 28 at distance
# 10), and exact duplicates among them are already caught. Their variety is the source's point.
NEAR_DUPLICATE_EXEMPT = frozenset({"typographic"})


@dataclass(frozen=True)
class Screened:
    """A loaded image's perceptual hash and what the configured filters said of it."""

    phash: str
    screening: Screening


def _screen_all(loaded: list[_Outcome], stage: ImagesStage) -> list[Screened | None]:
    """Hash and screen every loaded image (None for the rejected ones), in threads.

    Before the keep-or-fail pass, which is sequential (what an image is compared with depends
    on what was kept before it); this part is not, and it is the part that costs CPU."""
    filters = build_filters([spec.model_dump() for spec in stage.filters])
    budget = decode_budget(stage.decode_pixel_budget)

    def one(outcome: _Outcome) -> Screened | None:
        if isinstance(outcome, ImageRejected):
            return None
        stopping.check()
        image = outcome[0]
        with budget.hold(decode_cost((image.width, image.height), "RGB")):
            thumb = _thumbnail(image.data)
        view = FilterImage(thumb, image.width, image.height, image.data, image.format, image.scores)
        return Screened(phash(thumb), screen(filters, view))

    workers = min(8, os.cpu_count() or 1)
    with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(one, loaded))


def _thumbnail(data: bytes) -> Image.Image:
    """The normalised image at most SCREEN_SIDE on its longest side, RGB (a JPEG is decoded at
    a reduced scale directly: `draft`). Deterministic: the same bytes give the same pixels."""
    with Image.open(io.BytesIO(data)) as opened:
        opened.draft("RGB", (SCREEN_SIDE, SCREEN_SIDE))
        thumb = opened.convert("RGB")
    thumb.thumbnail((SCREEN_SIDE, SCREEN_SIDE), Image.Resampling.LANCZOS)
    return thumb


def _keep_or_fail(
    item: SourceItem,
    outcome: _Outcome,
    screened: Screened | None,
    first_seen: dict[str, str],
    near: HashIndex,
    limit: int,
) -> FailureRow | None:
    """None to keep the item (its hash then joins `near`), else its failure. In order: could not
    load, same bytes as a kept image, refused by a filter, near-duplicate of a kept image."""
    if isinstance(outcome, ImageRejected):
        return FailureRow(item.item_id, outcome.kind, outcome.reason, outcome.attempts)
    image = outcome[0]
    earlier = first_seen.get(image.image_id)
    if earlier is not None:
        reason = f"same image as {earlier} (image_id {image.image_id[:16]})"
        return FailureRow(item.item_id, "duplicate", reason)
    assert screened is not None
    refused = screened.screening
    if refused.kind is not None:
        return FailureRow(item.item_id, refused.kind, refused.reason or refused.kind)
    if limit > 0 and item.source not in NEAR_DUPLICATE_EXEMPT:
        match = near.nearest(screened.phash, limit)
        if match is not None:
            reason = (
                f"near-duplicate of {match.key}: perceptual hashes {match.distance} of "
                f"{HASH_BITS} bits apart (near_duplicate_distance {limit})"
            )
            return FailureRow(item.item_id, NEAR_DUPLICATE, reason)
        near.add(screened.phash, item.item_id)
    return None


def _by_source(kept: list[str], failed: list[str]) -> dict[str, dict[str, int]]:
    """Per source kind (folder, manifest, url, typographic, ...): items in, kept, failed."""
    out: dict[str, dict[str, int]] = {}
    for name, n in Counter(kept).items():
        out.setdefault(name, {"in": 0, "out": 0, "failed": 0})["out"] = n
    for name, n in Counter(failed).items():
        out.setdefault(name, {"in": 0, "out": 0, "failed": 0})["failed"] = n
    for counts in out.values():
        counts["in"] = counts["out"] + counts["failed"]
    return dict(sorted(out.items()))


def _filtered(failures: list[FailureRow]) -> dict[str, int]:
    """Filter rejections per filter (an error raised by a filter counts as its own kind)."""
    prefix = rejection_kind("")
    counts = Counter(
        f.kind.removeprefix(prefix)
        for f in failures
        if f.kind.startswith(prefix) and f.kind != FILTER_ERROR
    )
    return dict(sorted(counts.items()))


# --------------------------------------------------------------------------- loading

_Outcome = tuple[NormalizedImage, dict[str, Any]] | ImageRejected


async def _load_all(
    listing: SourceListing,
    typo: dict[int, TypographicVariant],
    canvas: int,
    stage: ImagesStage,
    guard: HostGuard | None,
) -> list[_Outcome]:
    items, root = listing.items, listing.root
    options = NormalizeOptions(
        max_side=stage.max_side,
        min_side=stage.min_side,
        max_pixels=stage.max_pixels,
        encoding=stage.encoding,
        pixel_budget=stage.decode_pixel_budget,
    )
    # Decoding and resizing release the GIL in Pillow, so threads give real parallelism.
    workers = min(8, os.cpu_count() or 1)
    cpu = asyncio.Semaphore(workers)
    net = asyncio.Semaphore(stage.download_concurrency)
    # Items in progress at once: bounds the raw bytes held (read or downloaded, not yet
    # normalised) to slots × max_bytes, however many items the branch has.
    slots = asyncio.Semaphore(stage.download_concurrency + workers)
    async with AsyncExitStack() as stack:
        client: ImageClient | None = None
        if any(item.url for item in items):
            client = await stack.enter_async_context(
                make_client(
                    timeout_s=stage.download_timeout_s,
                    concurrency=stage.download_concurrency,
                    guard=guard,
                )
            )

        async def one(index: int, item: SourceItem) -> _Outcome:
            async with slots:
                stopping.check()  # an interrupted run stops here, not after the branch
                try:
                    if index in typo:
                        async with cpu:
                            return await asyncio.to_thread(
                                _typographic, typo[index], canvas, options
                            )
                    if isinstance(item, GeneratedItem):  # its bytes (or failure) came with it
                        if item.failure is not None:
                            return item.failure
                        async with cpu:
                            generated = await asyncio.to_thread(normalize_bytes, item.data, options)
                        return generated, {}
                    if item.url is None:
                        assert item.path is not None and root is not None
                        async with cpu:
                            return await asyncio.to_thread(
                                _local, item.path, root, stage.max_bytes, options
                            )
                    assert client is not None
                    async with net:
                        fetched = await fetch_url(
                            client,
                            item.url,
                            max_bytes=stage.max_bytes,
                            timeout_s=stage.download_timeout_s,
                            attempts=stage.download_attempts,
                        )
                    async with cpu:
                        image = await asyncio.to_thread(normalize_bytes, fetched.data, options)
                    return image, _download_meta(item.url, fetched)
                except ImageRejected as exc:
                    return exc

        return list(await asyncio.gather(*(one(i, item) for i, item in enumerate(items))))
    raise AssertionError("unreachable")


def _local(
    path: Path, root: LocalRoot, max_bytes: int, options: NormalizeOptions
) -> tuple[NormalizedImage, dict[str, Any]]:
    return normalize_bytes(read_local(path, max_bytes, root=root), options), {}


def _download_meta(url: str, fetched: Fetched) -> dict[str, Any]:
    meta: dict[str, Any] = {"content_type": fetched.content_type}
    if fetched.final_url != safe_url(url):  # both without credentials
        meta["final_url"] = fetched.final_url
    if fetched.attempts > 1:
        meta["attempts"] = fetched.attempts
    return meta


def _typographic(
    variant: TypographicVariant, canvas: int, options: NormalizeOptions
) -> tuple[NormalizedImage, dict[str, Any]]:
    rendered = render(variant, canvas)
    # Rendered text is always lossless PNG, whatever `encoding` says for photos.
    png = dataclasses.replace(options, encoding="png")
    image = normalize_image(rendered.image, png)
    return image, {"font_size": rendered.font_size, "lines": list(rendered.lines)}


def _row(
    leaf: Subcategory,
    item: SourceItem,
    image: NormalizedImage,
    meta: dict[str, Any],
    screened: Screened,
) -> dict[str, Any]:
    source_meta = {**item.meta, **meta, "original": image.original}
    return {
        "image_id": image.image_id,
        "image_name": image.image_name,
        "bytes": image.data,
        "format": image.format,
        "width": image.width,
        "height": image.height,
        "source": item.source,
        "source_meta": _json(source_meta),
        "branch_id": leaf.branch_id,
        "class1": leaf.class1,
        "class2": leaf.class2,
        "class3": leaf.class3,
        "filter_scores": _json({**image.scores, **screened.screening.scores}),
        "phash": screened.phash,
    }


def _json(value: dict[str, Any]) -> str:
    return json.dumps(value, sort_keys=True, ensure_ascii=False, separators=(",", ":"))


def _components(path: str) -> list[str]:
    return [part.strip() for part in path.strip().strip("/").split("/")]


def _run(coro: Coroutine[Any, Any, _T]) -> _T:
    """asyncio.run, also when the calling thread already runs an event loop."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(asyncio.run, coro).result()
