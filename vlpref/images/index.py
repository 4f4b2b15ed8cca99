"""The embedded retrieval index: CLIP image embeddings of a user's own image pool in FAISS.

    vlpref index build POOL --model MODEL_DIR --out INDEX_DIR

`POOL` is a folder (every non-hidden file under it, symlinks kept inside it) or a manifest
(CSV, TSV, JSONL or Parquet with a `path` column, relative to the manifest). `MODEL_DIR` is an
open_clip model saved locally: `open_clip_config.json` (`model_cfg`, `preprocess_cfg`) and its
weights (`open_clip_model.safetensors`, or `open_clip_pytorch_model.bin`), which is how open_clip
models are published on the Hugging Face Hub, so a downloaded checkpoint folder works as is.
Nothing is downloaded: the Hub is switched off while the model loads.

The index folder holds:

- `index.faiss`: an exact inner-product index (`IndexFlatIP`) over L2-normalised image
  embeddings, so a score is the cosine similarity of a query's text embedding and the image's;
- `items.parquet`: one row per vector, in order: `path` (relative to the pool root), `sha256`,
  `width`, `height`;
- `index.json`: the format, the pool root, the model folder and its fingerprint (sha256 of its
  config and weights), the embedding size, the counts, and the files that were left out and why.

Queries must be embedded by the same model: opening an index with another model (a different
fingerprint) is a `ConfigError`. Images are read with the images stage's own guards (inside the
pool root, at most `max_bytes`, headers checked before decoding, vlpref/images/normalize.py).

torch, open_clip and faiss are the `retrieval` extra (`pip install 'vlpref[retrieval]'`); they
are imported only here, and only when an index is built or opened.
"""

from __future__ import annotations

import csv
import hashlib
import importlib
import io
import json
import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from vlpref.errors import ConfigError, DataError
from vlpref.images.normalize import ImageRejected, NormalizeOptions, normalize_bytes
from vlpref.images.sources import LocalRoot, _walk, read_local

__all__ = [
    "FORMAT",
    "BuildReport",
    "ClipModel",
    "LocalIndex",
    "build_index",
    "load_clip",
    "model_fingerprint",
    "open_index",
]

FORMAT = "vlpref-index/1"
INDEX_FILE, ITEMS_FILE, META_FILE = "index.faiss", "items.parquet", "index.json"
_CONFIG_FILE = "open_clip_config.json"
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pth", ".pt")
_EXTRA = "pip install 'vlpref[retrieval]' (torch, open_clip_torch, faiss-cpu)"


def _module(name: str) -> ModuleType:
    """An optional dependency, or a ConfigError that says how to install it."""
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        raise ConfigError(f"the embedded retrieval index needs {name!r}: {_EXTRA} ({exc})") from exc


# --------------------------------------------------------------------------- the model


def model_fingerprint(model_dir: Path) -> str:
    """sha256 over the model folder's config and weight files (names and contents)."""
    files = sorted(
        p
        for p in model_dir.iterdir()
        if p.is_file() and (p.name == _CONFIG_FILE or p.suffix in _WEIGHT_SUFFIXES)
    )
    if not any(p.name == _CONFIG_FILE for p in files):
        raise ConfigError(f"{model_dir}: no {_CONFIG_FILE} (an open_clip model folder has one)")
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.name.encode() + b"\0")
        with path.open("rb") as handle:
            while chunk := handle.read(1 << 20):
                digest.update(chunk)
    return digest.hexdigest()


@dataclass
class ClipModel:
    """An open_clip model in eval mode on the CPU, with its preprocessing and tokenizer."""

    path: Path
    fingerprint: str
    model: Any
    preprocess: Callable[[Any], Any]
    tokenizer: Callable[[Sequence[str]], Any]
    torch: ModuleType
    lock: threading.Lock = field(default_factory=threading.Lock)

    def embed_images(self, images: Sequence[Any]) -> Any:
        """L2-normalised float32 embeddings (numpy, one row per PIL image)."""
        with self.lock, self.torch.no_grad():
            batch = self.torch.stack([self.preprocess(im) for im in images])
            features = self.model.encode_image(batch)
            return self._normalised(features)

    def embed_texts(self, texts: Sequence[str]) -> Any:
        with self.lock, self.torch.no_grad():
            features = self.model.encode_text(self.tokenizer(list(texts)))
            return self._normalised(features)

    def _normalised(self, features: Any) -> Any:
        features = features / features.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        return features.float().cpu().numpy()


def load_clip(model_dir: str | Path) -> ClipModel:
    """An open_clip model from a local folder; never downloads (the Hub is switched off)."""
    path = Path(model_dir).expanduser().resolve()
    if not path.is_dir():
        raise ConfigError(f"open_clip model folder {str(model_dir)!r} does not exist")
    fingerprint = model_fingerprint(path)
    # Set before open_clip (and huggingface_hub) read it: a config naming a Hub tokenizer or
    # tower fails here instead of reaching out at run time.
    os.environ["HF_HUB_OFFLINE"] = "1"
    torch = _module("torch")
    open_clip = _module("open_clip")
    name = f"local-dir:{path}"
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(
            name, device="cpu", require_pretrained=True
        )
        tokenizer = open_clip.get_tokenizer(name)
    except (OSError, ValueError, RuntimeError, KeyError) as exc:
        raise ConfigError(f"cannot load the open_clip model in {path}: {exc}") from exc
    model.eval()
    return ClipModel(path, fingerprint, model, preprocess, tokenizer, torch)


# --------------------------------------------------------------------------- the pool


@dataclass(frozen=True)
class PoolItem:
    rel: str  # relative to the pool root, posix
    path: Path


def pool_items(pool: Path) -> tuple[LocalRoot, list[PoolItem], list[str]]:
    """The pool's root, its files (sorted), and the manifest rows that name no file."""
    pool = pool.expanduser().resolve()
    if pool.is_dir():
        root = LocalRoot.of(pool)
        return root, [PoolItem(rel, path) for rel, path in _walk(pool, root)], []
    if not pool.is_file():
        raise ConfigError(f"image pool {str(pool)!r} is neither a folder nor a manifest file")
    root = LocalRoot.of(pool.parent)
    items: list[PoolItem] = []
    skipped: list[str] = []
    for where, value in _manifest_paths(pool):
        if not value:
            skipped.append(f"{pool.name}:{where}")
            continue
        target = Path(value).expanduser()
        target = target if target.is_absolute() else pool.parent / target
        items.append(PoolItem(root.show(target), target))
    return root, items, skipped


def _manifest_paths(manifest: Path) -> Iterator[tuple[str, str]]:
    """(where, path) of each row of a CSV/TSV/JSONL/Parquet file with a `path` column."""
    suffix = manifest.suffix.lower()
    try:
        if suffix in (".parquet", ".pq"):
            table = pq.read_table(manifest, columns=["path"])
            for number, value in enumerate(table.column("path").to_pylist(), start=1):
                yield f"row {number}", str(value or "").strip()
            return
        text = manifest.read_text(encoding="utf-8-sig")
    except (OSError, ValueError, KeyError) as exc:
        raise DataError(f"image pool manifest {manifest.name!r} cannot be read: {exc}") from None
    if suffix in (".jsonl", ".ndjson"):
        for number, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                try:
                    row = json.loads(line)
                except ValueError:
                    row = None
                path = row.get("path") if isinstance(row, dict) else None
                yield f"line {number}", path.strip() if isinstance(path, str) else ""
        return
    if suffix not in (".csv", ".tsv"):
        raise ConfigError(f"image pool {manifest.name!r}: a folder, or a .csv/.tsv/.jsonl/.parquet")
    reader = csv.DictReader(
        io.StringIO(text, newline=""), delimiter="\t" if suffix == ".tsv" else ","
    )
    if "path" not in (reader.fieldnames or []):
        raise DataError(f"image pool manifest {manifest.name!r} has no `path` column")
    previous = reader.line_num
    for row in reader:
        yield f"line {previous + 1}", (row.get("path") or "").strip()
        previous = reader.line_num


# --------------------------------------------------------------------------- building


@dataclass
class BuildReport:
    indexed: int
    skipped: dict[str, str]  # item -> why it was left out
    seconds: float
    out: Path


def build_index(
    pool: str | Path,
    model_dir: str | Path,
    out: str | Path,
    *,
    batch_size: int = 32,
    max_bytes: int = 20_000_000,
    max_pixels: int = 64_000_000,
    progress: Callable[[int, int], None] | None = None,
) -> BuildReport:
    """Embed every readable image of the pool and write the index folder `out`."""
    started = time.perf_counter()
    faiss = _module("faiss")
    numpy = _module("numpy")
    image_module = _module("PIL.Image")
    clip = load_clip(model_dir)
    root, items, unusable = pool_items(Path(pool))
    skipped: dict[str, str] = {row: "manifest row without a path" for row in unusable}
    # Decoded through the stage's normaliser: the same bomb and size guards as a run, and the
    # same RGB conversion; 1024 px is more than any CLIP input needs.
    options = NormalizeOptions(max_side=1024, min_side=1, max_pixels=max_pixels, encoding="png")
    vectors: list[Any] = []
    kept: list[dict[str, Any]] = []
    batch: list[tuple[dict[str, Any], Any]] = []

    def flush() -> None:
        if batch:
            vectors.append(clip.embed_images([image for _, image in batch]))
            kept.extend(row for row, _ in batch)
            batch.clear()

    for number, item in enumerate(items, start=1):
        try:
            data = read_local(item.path, max_bytes, root=root)
            image = normalize_bytes(data, options)
        except ImageRejected as exc:
            skipped[item.rel] = f"{exc.kind}: {exc.reason}"
            continue
        pil = image_module.open(io.BytesIO(image.data)).convert("RGB")
        row = {
            "path": item.rel,
            "sha256": hashlib.sha256(data).hexdigest(),
            "width": image.original.get("width", image.width),
            "height": image.original.get("height", image.height),
        }
        batch.append((row, pil))
        if len(batch) >= batch_size:
            flush()
        if progress is not None:
            progress(number, len(items))
    flush()
    if not kept:
        raise DataError(f"no image of the pool {str(pool)!r} could be indexed")
    matrix = numpy.ascontiguousarray(numpy.concatenate(vectors), dtype="float32")
    index = faiss.IndexFlatIP(matrix.shape[1])
    index.add(matrix)

    target = Path(out).expanduser().resolve()
    target.mkdir(parents=True, exist_ok=True)
    faiss.write_index(index, str(target / INDEX_FILE))
    pq.write_table(pa.Table.from_pylist(kept), target / ITEMS_FILE)
    meta = {
        "format": FORMAT,
        "root": root.real,
        "model": {"path": str(clip.path), "fingerprint": clip.fingerprint},
        "dim": int(matrix.shape[1]),
        "count": len(kept),
        "skipped": skipped,
        "built": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    # index.json last: a folder without it is an unfinished build, which `open_index` refuses.
    (target / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True), encoding="utf-8")
    return BuildReport(len(kept), skipped, time.perf_counter() - started, target)


# --------------------------------------------------------------------------- searching


@dataclass
class LocalIndex:
    """An opened index: `search` embeds query texts and returns (row, score) lists."""

    path: Path
    root: Path
    rows: list[dict[str, Any]]
    meta: dict[str, Any]
    clip: ClipModel
    index: Any

    def search(self, texts: Sequence[str], k: int) -> list[list[tuple[dict[str, Any], float]]]:
        """For each text, its `k` most similar images, best first (cosine similarity)."""
        if not texts:
            return []
        queries = self.clip.embed_texts(texts)
        k = min(k, len(self.rows))
        with self.clip.lock:  # a FAISS index is not safe to search from several threads
            scores, ids = self.index.search(queries, k)
        return [
            [
                (self.rows[int(i)], float(s))
                for i, s in zip(ids[q], scores[q], strict=True)
                if i >= 0
            ]
            for q in range(len(texts))
        ]


_opened: dict[tuple[str, int, str], LocalIndex] = {}
_open_lock = threading.Lock()


def open_index(index_dir: str | Path, model_dir: str | Path | None = None) -> LocalIndex:
    """The index in `index_dir`, with the model that built it (or `model_dir`, which must be that
    model). Opened once per process while the folder is unchanged: branches share it."""
    path = Path(index_dir).expanduser().resolve()
    meta_path = path / META_FILE
    if not meta_path.is_file():
        raise ConfigError(
            f"{index_dir!s}: not a vlpref index (no {META_FILE}; make one with `vlpref index "
            "build`, which writes it last)"
        )
    key = (str(path), meta_path.stat().st_mtime_ns, str(model_dir or ""))
    with _open_lock:
        found = _opened.get(key)
        if found is None:
            found = _opened[key] = _open(path, meta_path, model_dir)
        return found


def _open(path: Path, meta_path: Path, model_dir: str | Path | None) -> LocalIndex:
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    if meta.get("format") != FORMAT:
        raise ConfigError(f"{path}: index format {meta.get('format')!r}, expected {FORMAT!r}")
    recorded = meta["model"]
    clip = load_clip(model_dir if model_dir is not None else recorded["path"])
    if clip.fingerprint != recorded["fingerprint"]:
        raise ConfigError(
            f"{path}: built with the model {recorded['path']} (fingerprint "
            f"{recorded['fingerprint'][:12]}), not with {clip.path} ({clip.fingerprint[:12]}): "
            "queries must be embedded by the index's own model (rebuild the index, or point "
            "`model` at that model)"
        )
    faiss = _module("faiss")
    index = faiss.read_index(str(path / INDEX_FILE))
    rows = pq.read_table(path / ITEMS_FILE).to_pylist()
    if index.ntotal != len(rows):
        raise DataError(f"{path}: {index.ntotal} vectors but {len(rows)} items (a broken build)")
    return LocalIndex(path, Path(meta["root"]), rows, meta, clip, index)
