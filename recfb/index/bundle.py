"""Model bundles: everything the retrieval service needs from one trained run, in one directory.

Layout of `models/<name>/` (schema version 1):

| file | contents |
|---|---|
| `manifest.json` | schema version, name, run id, family, sizes, index factory, measured |
|  | recall and build time, fold-in targets, sha256 of every other file |
| `items.parquet` | `item_idx, item_id, popularity` (+ `category` where the ETL passed it) |
| `users.parquet` | `user_idx, user_id` |
| `*_vectors.npy` | float32 (n, d) item / user vectors: score = inner product (GNOLR: concat) |
| `index.faiss` | FAISS index of the item vectors (CPU; moved to a GPU at load when present) |
| `seen.parquet` | `user_idx, item_idx, label`: every pair the ETL saw, for exclusion |
| `signals.json` | the ETL's resolved signal map: how online events map to levels and negatives |
| `delays.json` | optional: fitted delay models of click -> purchase -> refund (`recfb.delayed`) |
| `cascade_events.parquet` | optional: `user_idx, item_idx, event, ts, cancelled_at` of the |
|  | clock and purchase events of the last `rates_horizon_days`: where online rates start |
| `rank.json`, `ranker.txt` | optional (two-stage): the LambdaRank model and its feature columns |
| `item_stats.parquet` | item features as of the end of the log (`recfb.rank.features`) |
| `history.parquet` | the last 30 days of events (at most 2,000 per user): pair and user features |
| `cascade_candidates.parquet` | the cascade walk's top items of every known user |

Written into a temp directory and renamed into place; a bundle whose files do not match the
manifest's checksums is refused at load.

Authenticity: `manifest.sig` holds an HMAC-SHA256 of the canonical manifest (sorted keys, no
spaces), which names every file's sha256, under the bundle key: `RECFB_BUNDLE_KEY` (at least
16 characters) or the key file `$RECFB_CONFIG_DIR/bundle.key` (default
`~/.config/recfb/bundle.key`, created 0600 with 32 random bytes on the first publish when no
key is configured). A host that serves bundles built elsewhere needs the builder's key. A
bundle whose signature is missing or does not match is refused, unless the insecure switch is
on: `RECFB_ALLOW_UNSIGNED=1` (any process) or `serve.allow_unsigned: true` (the service);
checksums are checked either way. Every name in the manifest's `files` must be a plain
relative name of a regular file inside the bundle directory (no absolute path, no `..`, no
symlink out of it). `gate.json` beside the manifest is the promotion gate's signed verdict on
this bundle (`write_gate_verdict`), read by `recfb serve` when it picks a default bundle.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import logging
import os
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import polars as pl

from recfb.errors import InputError, RecfbError
from recfb.index.ann import BuiltIndex, IpIndex, apply_search_params, build_measured
from recfb.index.config import IndexConfig
from recfb.io import atomic_dir, write_json

log = logging.getLogger(__name__)
SCHEMA_VERSION = 1
FILES = (
    "items.parquet",
    "users.parquet",
    "item_vectors.npy",
    "user_vectors.npy",
    "index.faiss",
    "seen.parquet",
    "signals.json",
)


RECOMMENDER_FILE = "recommender.json"  # family + config: what `recfb.Recommender.load` reads
PAIRS_FILES = ("items.parquet", "users.parquet", "seen.parquet", "signals.json", "pairs.parquet")


def write_pairs_bundle(
    catalog: dict[str, Any], pairs: pl.DataFrame, recommender: dict[str, Any], target: Path
) -> Path:
    """The bundle of a training-free family: its fitted pairs instead of vectors (the
    library refits from them; the HTTP service, which needs vectors, refuses it)."""
    created = datetime.now(UTC)
    with atomic_dir(target) as tmp:
        catalog["items"].write_parquet(tmp / "items.parquet")
        catalog["users"].write_parquet(tmp / "users.parquet")
        catalog["seen"].write_parquet(tmp / "seen.parquet")
        write_json(tmp / "signals.json", catalog["signals"])
        pairs.write_parquet(tmp / "pairs.parquet")
        write_json(tmp / RECOMMENDER_FILE, recommender)
        files = [*PAIRS_FILES, RECOMMENDER_FILE]
        manifest = {
            "schema_version": SCHEMA_VERSION,
            "name": target.name,
            "created_at": created.isoformat(),
            "family": recommender["family"],
            "kind": "pairs",
            "data": catalog.get("data"),
            "data_end_ms": catalog.get("data_end_ms"),
            "levels": catalog["levels"],
            "files": {f: sha256(tmp / f) for f in files},
        }
        write_json(tmp / "manifest.json", manifest)
        sign_manifest(tmp, manifest)
    return target


def read_pairs_bundle(path: Path) -> dict[str, Any]:
    """A training-free family's bundle, verified."""
    manifest = verify(path, required=PAIRS_FILES)
    out: dict[str, Any] = {"manifest": manifest}
    for name in ("items", "users", "seen", "pairs"):
        out[name] = pl.read_parquet(path / f"{name}.parquet")
    out["signals"] = json.loads((path / "signals.json").read_text())
    return out


class BundleError(RecfbError):
    """A bundle cannot be used: missing, corrupt or of an unknown schema."""


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


SIGNATURE_FILE = "manifest.sig"
GATE_FILE = "gate.json"
KEY_ENV, KEY_FILE_ENV, UNSIGNED_ENV = "RECFB_BUNDLE_KEY", "RECFB_CONFIG_DIR", "RECFB_ALLOW_UNSIGNED"
MIN_KEY_CHARS = 16


def key_path() -> Path:
    """Where the bundle key file lives: `$RECFB_CONFIG_DIR/bundle.key`, default
    `~/.config/recfb/bundle.key`."""
    base = os.environ.get(KEY_FILE_ENV) or Path.home() / ".config" / "recfb"
    return Path(base) / "bundle.key"


def bundle_key(create: bool = False) -> bytes | None:
    """The signing key: `RECFB_BUNDLE_KEY`, else the key file; with `create` (a publish) a
    missing key file is created 0600 with a random key, so a fresh machine works end to end."""
    env = os.environ.get(KEY_ENV)
    if env:
        if len(env) < MIN_KEY_CHARS:
            raise BundleError(f"{KEY_ENV} is {len(env)} characters; use at least {MIN_KEY_CHARS}")
        return env.encode()
    path = key_path()
    if not path.exists() and create:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:  # another process created it first: use theirs
            pass
        else:
            with os.fdopen(fd, "w") as f:
                f.write(secrets.token_hex(32) + "\n")
            log.warning("created the bundle signing key %s (copy it to hosts that serve)", path)
    if not path.exists():
        return None
    try:
        text = path.read_text().strip()
    except OSError as exc:
        raise BundleError(f"bundle key {path} cannot be read: {exc}") from exc
    if len(text) < MIN_KEY_CHARS:
        raise BundleError(f"bundle key {path} holds {len(text)} characters; expected a key")
    if path.stat().st_mode & 0o077:
        log.warning("bundle key %s is readable by other users; chmod 600 it", path)
    return text.encode()


def canonical(manifest: dict[str, Any]) -> bytes:
    """The bytes a signature covers: the manifest as sorted, compact JSON."""
    return json.dumps(manifest, sort_keys=True, separators=(",", ":"), default=str).encode()


def _mac(key: bytes, data: bytes) -> str:
    return hmac.new(key, data, hashlib.sha256).hexdigest()


def key_id(key: bytes) -> str:
    """A short public fingerprint of a key: names which key signed, never the key."""
    return hashlib.sha256(b"recfb-key-id:" + key).hexdigest()[:12]


def sign_manifest(bundle: Path, manifest: dict[str, Any]) -> None:
    """Write `manifest.sig` for `manifest` (already written as manifest.json) with the key."""
    key = bundle_key(create=True)
    assert key is not None  # create=True makes one
    sig = {"alg": "HMAC-SHA256", "key_id": key_id(key), "mac": _mac(key, canonical(manifest))}
    write_json(bundle / SIGNATURE_FILE, sig)


def allow_unsigned_default() -> bool:
    return os.environ.get(UNSIGNED_ENV, "").strip().lower() in ("1", "true", "yes")


def check_signature(path: Path, manifest: dict[str, Any], allow_unsigned: bool) -> None:
    """Refuse a bundle whose manifest signature is missing or wrong (unless allowed)."""
    problem = _signature_problem(path, manifest)
    if problem is None:
        return
    if allow_unsigned:
        log.warning(
            "bundle %s: %s; loaded anyway (insecure: unsigned bundles allowed)", path, problem
        )
        return
    raise BundleError(
        f"bundle {path}: {problem}; refused. Sign bundles with the same key on every host "
        f"({KEY_ENV} or {key_path()}), or set {UNSIGNED_ENV}=1 / serve.allow_unsigned=true "
        "to accept unsigned bundles (insecure)"
    )


def _signature_problem(path: Path, manifest: dict[str, Any]) -> str | None:
    sig_path = path / SIGNATURE_FILE
    if not sig_path.is_file():
        return f"{SIGNATURE_FILE} missing (unsigned)"
    try:
        sig = json.loads(sig_path.read_text())
        mac, signer = str(sig["mac"]), str(sig.get("key_id"))
    except (ValueError, KeyError, TypeError) as exc:
        return f"{SIGNATURE_FILE} is not a signature ({type(exc).__name__})"
    key = bundle_key()
    if key is None:
        return f"signed with key {signer}, but no key is configured here"
    if not hmac.compare_digest(mac, _mac(key, canonical(manifest))):
        if signer != key_id(key):
            return f"signed with key {signer}, not this host's key {key_id(key)}"
        return "signature does not match the manifest (modified after signing)"
    return None


def bundle_file(path: Path, name: Any) -> Path:
    """The file a manifest names, refused unless it is a plain relative name of a regular
    file inside the bundle directory."""
    if not isinstance(name, str) or not name or "\\" in name or "\x00" in name:
        raise BundleError(f"bundle {path}: manifest names a file {name!r}; expected a file name")
    rel = Path(name)
    if rel.is_absolute() or any(part in ("", ".", "..") for part in name.split("/")):
        raise BundleError(
            f"bundle {path}: manifest names {name!r}, outside the bundle directory; refused"
        )
    file = path / rel
    root = path.resolve()
    if not file.resolve().is_relative_to(root) or file.resolve() == root:
        raise BundleError(f"bundle {path}: {name} leads outside the bundle directory; refused")
    return file


def write_gate_verdict(
    bundle: str | Path, passed: bool, reason: str, model: str | None, version: str | None
) -> None:
    """Record the promotion gate's verdict on a published bundle (`gate.json`, signed and
    bound to this manifest): what `recfb serve` trusts when it picks a default bundle."""
    bundle = Path(bundle)
    manifest = json.loads((bundle / "manifest.json").read_text())
    verdict = {
        "gate": "passed" if passed else "rejected",
        "reason": reason,
        "model": model,
        "version": version,
        "decided_at": datetime.now(UTC).isoformat(),
        "manifest_sha256": hashlib.sha256(canonical(manifest)).hexdigest(),
    }
    key = bundle_key(create=True)
    assert key is not None
    write_json(bundle / GATE_FILE, verdict | {"mac": _mac(key, canonical(verdict))})


def gate_verdict(bundle: Path) -> str | None:
    """'passed' or 'rejected' from a bundle's `gate.json`, None when never judged; a verdict
    that is unsigned, forged or about another manifest counts as 'rejected'."""
    path = Path(bundle) / GATE_FILE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
        mac = data.pop("mac")
        manifest = json.loads((Path(bundle) / "manifest.json").read_text())
        key = bundle_key()
    except (OSError, ValueError, KeyError, AttributeError, BundleError):
        return "rejected"
    if key is None or not hmac.compare_digest(str(mac), _mac(key, canonical(data))):
        return "rejected"
    if data.get("manifest_sha256") != hashlib.sha256(canonical(manifest)).hexdigest():
        return "rejected"
    return "passed" if data.get("gate") == "passed" else "rejected"


@dataclass
class BundleResult:
    path: Path
    manifest: dict[str, Any]


def foldin_targets(users: np.ndarray, items: np.ndarray, sample: np.ndarray) -> dict[str, float]:
    """Scores a fold-in aims for: `positive` = a user's typical best score (mean top-10),
    `negative` = a low one (mean 5th percentile); measured on the model's own users."""
    scores = users[sample] @ items.T
    top = np.sort(scores, axis=1)[:, -min(10, scores.shape[1]) :]
    return {
        "positive": float(top.mean()),
        "negative": float(np.percentile(scores, 5, axis=1).mean()),
        "item_sq_norm": float((items**2).sum(1).mean()),
    }


@dataclass
class BundleParts:
    """What a bundle is made of, before it is indexed and written."""

    items: pl.DataFrame  # item_idx, item_id, popularity [, category]
    users: pl.DataFrame  # user_idx, user_id
    item_vectors: np.ndarray
    user_vectors: np.ndarray
    seen: pl.DataFrame  # user_idx, item_idx, label
    signals: dict[str, Any]  # the resolved signal map
    levels: dict[str, str]
    run_id: str | None = None
    family: str = "unknown"
    data: str | None = None
    delays: Any = None  # recfb.delayed.fit.DelayFits, where the log has a conversion cascade
    cascade_events: pl.DataFrame | None = None
    rank_dir: Path | None = None  # the rank stage's ranker: the bundle serves two stages
    rank_data: Any = None  # the Interactions the rank files are built from (default: `data`)
    recommender: dict[str, Any] | None = None  # `recommender.json`: family + config, for load
    data_end_ms: int | None = None  # the end of the log the model saw (its clock)


def catalog_parts(data: Any) -> dict[str, Any]:
    """The parts of a bundle that come from the data rather than the model, from an
    in-memory `Interactions`: items (with popularity and category), users, every seen
    pair, the signal map and level names."""
    from recfb.rank.state import cut_points

    spec = data.stats.get("signal_map_spec")
    if spec is None:
        raise InputError(
            "field 'signal_map_spec' missing: the ETL output predates bundles; rerun `recfb etl`",
            file=str(data.directory or "<memory>"),
        )
    splits = [data.train, data.valid, data.test]
    seen = pl.concat(
        [f.select(pl.col("user_idx", "item_idx").cast(pl.UInt32), "label") for f in splits]
    )
    pop = seen.filter(pl.col("label") >= 1).group_by("item_idx").agg(pl.len().alias("popularity"))
    items = (
        data.items.select(pl.col("item_idx").cast(pl.UInt32), "item_id")
        .join(pop, on="item_idx", how="left")
        .with_columns(pl.col("popularity").fill_null(0).cast(pl.Int64))
    )
    if all("category" in f.columns for f in splits):
        category = (
            pl.concat([f.select(pl.col("item_idx").cast(pl.UInt32), "category") for f in splits])
            .drop_nulls("category")
            .group_by("item_idx")
            .agg(pl.col("category").first())
        )
        items = items.join(category, on="item_idx", how="left")
    _, _, end_ms = cut_points(data.stats)
    return {
        "items": items.sort("item_idx"),
        "users": data.users.select("user_idx", "user_id").sort("user_idx"),
        "seen": seen,
        "signals": spec,
        "levels": data.stats["levels"],
        "data": str(data.directory) if data.directory else None,
        "data_end_ms": end_ms,
    }


def build_bundle(cfg: IndexConfig) -> BundleResult:
    """Index a trained run's item vectors and publish the bundle into the model store."""
    from recfb.train.runs import load_run

    if not cfg.run_id:
        raise RecfbError("index.run_id: name the MLflow run to index (recfb index --run ID)")
    from recfb.etl.interactions import Interactions

    train_cfg, scorer = load_run(cfg.run_id)
    data = Interactions.load(train_cfg.data)
    items = scorer.item_vectors.numpy().astype(np.float32)
    catalog = catalog_parts(data)
    if catalog["items"].height != len(items):
        raise InputError(
            f"items.parquet has {catalog['items'].height} rows, vectors {len(items)}",
            file=str(train_cfg.data),
        )
    family = "two_stage" if cfg.rank_dir else train_cfg.model.family
    config: dict[str, Any] = train_cfg.model_dump(mode="json")
    if cfg.rank_dir:
        rank_meta = json.loads((Path(cfg.rank_dir) / "rank.json").read_text())
        config = {"embedding": config, "rank": rank_meta["config"]}
    parts = BundleParts(
        **catalog,
        item_vectors=items,
        user_vectors=scorer.user_vectors.numpy().astype(np.float32),
        run_id=cfg.run_id,
        family=family,
        rank_dir=Path(cfg.rank_dir) if cfg.rank_dir else None,
        rank_data=data,
        recommender={"family": family, "config": config},
    )
    if cfg.delays:
        parts.delays, parts.cascade_events = delay_parts(data, cfg.rates_horizon_days)
    result = write_bundle(parts, cfg)
    _log_to_run(cfg.run_id, result.manifest["index"], result.manifest["name"], parts.delays)
    return result


def delay_parts(etl: Any, horizon_days: float) -> tuple[Any, pl.DataFrame | None]:
    """Delay models and recent cascade events, or (None, None) where the signal map has no
    conversion (no clock signal or purchase level) or too few purchases to fit."""
    from recfb.delayed.fit import fit_delays, recent_cascade_events

    try:
        fits = fit_delays(etl)
    except InputError as exc:
        log.warning("no delay models in the bundle: %s", exc)
        return None, None
    return fits, recent_cascade_events(etl, fits.cutoff_ms, horizon_days)


def write_bundle(parts: BundleParts, cfg: IndexConfig) -> BundleResult:
    """Build the index, hold it to the recall floor, and write the bundle atomically."""
    users, items = parts.user_vectors, parts.item_vectors
    rng = np.random.default_rng(cfg.seed)
    sample = rng.choice(len(users), size=min(cfg.recall_sample, len(users)), replace=False)
    built, recall = build_measured(items, users[sample], cfg)
    if recall < cfg.recall_floor and cfg.low_recall == "exact":
        log.warning(
            "index %r recalls %.3f@%d of exact search (floor %.2f): the bundle searches exactly",
            built.factory,
            recall,
            cfg.recall_k,
            cfg.recall_floor,
        )
        cfg = cfg.model_copy(update={"factory": "Flat", "search_params": None})
        built, recall = build_measured(items, users[sample], cfg)
    index_info = _index_info(built, recall, cfg, len(sample))
    if recall < cfg.recall_floor:
        raise RecfbError(
            f"index {built.factory!r} ({built.search_params or 'default search parameters'}) "
            f"recalls {recall:.3f}@{cfg.recall_k} of exact search, below index.recall_floor="
            f"{cfg.recall_floor}; not published. Raise efSearch/nprobe (index.search_params) or "
            "choose another index.factory"
        )
    created = datetime.now(UTC)
    run = (parts.run_id or "none")[:8]
    name = cfg.name or f"{parts.family}-{run}-{created:%Y%m%dT%H%M%S}"
    target = Path(cfg.models_dir) / name
    with atomic_dir(target) as tmp:
        parts.items.write_parquet(tmp / "items.parquet")
        parts.users.write_parquet(tmp / "users.parquet")
        np.save(tmp / "item_vectors.npy", items)
        np.save(tmp / "user_vectors.npy", users)
        faiss.write_index(built.index.index, str(tmp / "index.faiss"))
        parts.seen.write_parquet(tmp / "seen.parquet")
        write_json(tmp / "signals.json", parts.signals)
        files = list(FILES)
        if parts.delays is not None and parts.cascade_events is not None:
            write_json(tmp / "delays.json", parts.delays.to_dict())
            parts.cascade_events.write_parquet(tmp / "cascade_events.parquet")
            files += ["delays.json", "cascade_events.parquet"]
        rank_data = parts.rank_data if parts.rank_data is not None else parts.data
        if parts.rank_dir is not None and rank_data is not None:
            from recfb.rank.publish import write_rank_files

            files += write_rank_files(rank_data, parts.rank_dir, tmp, len(users))
        if parts.recommender is not None:
            write_json(tmp / RECOMMENDER_FILE, parts.recommender)
            files.append(RECOMMENDER_FILE)
        manifest = {
            "schema_version": SCHEMA_VERSION,
            "name": name,
            "created_at": created.isoformat(),
            "run_id": parts.run_id,
            "family": parts.family,
            "data": parts.data,
            "data_end_ms": parts.data_end_ms,
            "kind": "vectors",
            "n_users": len(users),
            "n_items": len(items),
            "dim": int(items.shape[1]),
            "levels": parts.levels,
            "index": index_info,
            "foldin": foldin_targets(users, items, sample),
            "two_stage": parts.rank_dir is not None,
            "files": {f: sha256(tmp / f) for f in files},
        }
        write_json(tmp / "manifest.json", manifest)
        sign_manifest(tmp, manifest)
    return BundleResult(target, manifest)


def _index_info(built: BuiltIndex, recall: float, cfg: IndexConfig, sample: int) -> dict:
    return {
        "factory": built.factory,
        "search_params": built.search_params,
        "metric": "inner_product",
        "mips_augment": built.index.augment,
        "device": built.device,
        "build_s": round(built.build_s, 3),
        "recall_k": cfg.recall_k,
        "recall": round(recall, 5),
        "recall_sample": sample,
        "recall_floor": cfg.recall_floor,
    }


def _log_to_run(run_id: str, info: dict, name: str, delays: Any = None) -> None:
    """The index's figures (and the delay models, with their plot) join the training run."""
    import mlflow

    from recfb import tracking

    tracking.configure()
    with mlflow.start_run(run_id=run_id):
        metrics = {
            f"index/recall@{info['recall_k']}": info["recall"],
            "index/build_s": info["build_s"],
        }
        if delays is not None:
            from recfb.delayed.plots import delay_curves
            from recfb.tracking.plots import plt

            metrics["delay/conversion_median_h"] = delays.conversion.overall.median_s() / 3600
            metrics["delay/conversion_p"] = delays.conversion.overall.p
            if delays.refund is not None:
                metrics["delay/refund_median_h"] = delays.refund.overall.median_s() / 3600
                metrics["delay/refund_p"] = delays.refund.overall.p
            mlflow.log_dict(delays.to_dict(), "delays/delays.json")
            fig = delay_curves(delays)
            mlflow.log_figure(fig, "delays/delay_curves.png")
            plt.close(fig)
        tracking.log_metrics(metrics)
        mlflow.set_tags({"index.factory": info["factory"], "index.bundle": name})


@dataclass
class Bundle:
    """A loaded, verified bundle: what one version of the service answers from."""

    path: Path
    manifest: dict[str, Any]
    items: pl.DataFrame
    users: pl.DataFrame
    item_vectors: np.ndarray
    user_vectors: np.ndarray
    index: IpIndex
    seen: pl.DataFrame
    signals: dict[str, Any]
    delays: dict[str, Any] | None = None
    cascade_events: pl.DataFrame | None = None

    @property
    def version(self) -> str:
        return str(self.manifest["name"])


def verify(
    path: Path, required: tuple[str, ...] = FILES, allow_unsigned: bool | None = None
) -> dict[str, Any]:
    """The manifest, after checking schema version, the signature, that every file it names
    lies inside the bundle, and every file's checksum. `allow_unsigned` None: the
    `RECFB_ALLOW_UNSIGNED` environment variable decides."""
    path = Path(path)
    manifest_path = path / "manifest.json"
    if not manifest_path.is_file():
        raise BundleError(f"bundle {path}: manifest.json missing (not a bundle directory?)")
    try:
        manifest = json.loads(manifest_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BundleError(f"bundle {path}: manifest.json is not valid JSON: {exc}") from exc
    if not isinstance(manifest, dict):
        raise BundleError(f"bundle {path}: manifest.json is not a JSON object")
    if manifest.get("schema_version") != SCHEMA_VERSION:
        raise BundleError(
            f"bundle {path}: schema_version {manifest.get('schema_version')!r}, "
            f"this recfb reads {SCHEMA_VERSION}"
        )
    files = manifest.get("files", {})
    if not isinstance(files, dict):
        raise BundleError(f"bundle {path}: manifest field 'files' is not an object")
    located = {name: bundle_file(path, name) for name in files}
    if allow_unsigned is None:
        allow_unsigned = allow_unsigned_default()
    check_signature(path, manifest, allow_unsigned)
    for name, expected in files.items():
        file = located[name]
        if not file.is_file():
            raise BundleError(f"bundle {path}: file {name} listed in the manifest is missing")
        if sha256(file) != expected:
            raise BundleError(
                f"bundle {path}: file {name} fails its checksum (corrupt or modified); refused"
            )
    if manifest.get("kind") == "pairs" and required == FILES:
        raise BundleError(
            f"bundle {path}: family {manifest.get('family')!r} has no vectors to serve over "
            "HTTP (popularity, itemknn and cascade are served by the library and "
            "`recfb recommend`); publish an embedding or two-stage model"
        )
    missing = [f for f in required if f not in files]
    if missing:
        raise BundleError(f"bundle {path}: manifest lists no checksum for {missing}")
    return manifest


def load_bundle(
    path: str | Path, device: str = "auto", allow_unsigned: bool | None = None, mmap: bool = False
) -> Bundle:
    """Verify and load a bundle; the index goes to the GPU when one is usable. Optional
    files are read only when the (signed) manifest lists them.

    With `mmap` the index (Flat, HNSW and IVF alike: `IO_FLAG_MMAP_IFC`) and the vectors are
    memory-mapped read-only after the checksums passed, so several server processes on one
    machine share one copy through the page cache. A published bundle is never rewritten in
    place (`write_bundle` renames a finished directory), which is what makes this safe."""
    from recfb.index.ann import gpu_available

    path = Path(path)
    manifest = verify(path, allow_unsigned=allow_unsigned)
    listed = manifest["files"]
    flags = faiss.IO_FLAG_MMAP_IFC if mmap else 0  # with IO_FLAG_MMAP too, IVF fails
    index = faiss.read_index(str(path / "index.faiss"), flags)
    mode = "r" if mmap else None
    apply_search_params(index, manifest["index"].get("search_params"))
    if device == "gpu" or (device == "auto" and gpu_available()):
        # an index without a GPU version (HNSW) stays on the CPU
        with contextlib.suppress(RuntimeError):
            index = faiss.index_cpu_to_all_gpus(index)
    return Bundle(
        path=path,
        manifest=manifest,
        items=pl.read_parquet(path / "items.parquet"),
        users=pl.read_parquet(path / "users.parquet"),
        item_vectors=np.load(path / "item_vectors.npy", mmap_mode=mode),
        user_vectors=np.load(path / "user_vectors.npy", mmap_mode=mode),
        index=IpIndex(index, manifest["index"].get("mips_augment")),
        seen=pl.read_parquet(path / "seen.parquet"),
        signals=json.loads((path / "signals.json").read_text()),
        delays=json.loads((path / "delays.json").read_text()) if "delays.json" in listed else None,
        cascade_events=pl.read_parquet(path / "cascade_events.parquet")
        if "cascade_events.parquet" in listed
        else None,
    )
