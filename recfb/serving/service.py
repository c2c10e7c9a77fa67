"""The service's state: the bundle being served, the event log, metrics, the alias follower.

Every request reads `Service.current` once, so a swap (an atomic reference assignment) never
mixes two versions inside one answer and never fails a request in flight. `startup_bundle`
is the one place that decides which bundle a starting server loads; `Service.load` the one
place that loads a bundle path (at start, on POST /v1/admin/bundle, when the alias moves).

Without `--bundle`, a server starts on the registry's alias (`follow.alias`, `production`) of
`follow.model` (default `recfb`, the pipelines' registered model), else on the newest bundle in
`models_dir` that the promotion gate passed (its signed `gate.json`), never a rejected one. A
bundle never judged counts as passed only when no registry knows the model (no tracking store,
or no registered model of that name: bundles built by hand with `recfb index`); where the
registry has the model but no alias, or cannot be reached, only a passed bundle is served.
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from fastapi import HTTPException

from recfb.index import load_bundle
from recfb.index.bundle import gate_verdict
from recfb.serving.config import ServeConfig
from recfb.serving.logstore import open_event_log
from recfb.serving.retrieval import ServingBundle
from recfb.serving.telemetry import Metrics

log = logging.getLogger("recfb.serving")


class Service:
    """Holds the current bundle and the event log; swaps bundles in the background."""

    def __init__(self, cfg: ServeConfig, api_key: str | None) -> None:
        self.cfg = cfg
        self.api_key = api_key
        self.metrics = Metrics()
        self.log = open_event_log(cfg.event_log, cfg.synchronous)
        self.current: ServingBundle | None = None
        self.loading: str | None = None
        self.last_error: str | None = None
        self.follower: AliasFollower | None = None
        self._swap_lock = threading.Lock()

    def load(self, path: str | Path) -> ServingBundle:
        """Load the bundle at `path` and swap it in (one reference assignment)."""
        from recfb.serving.fetch import resolve  # a models:/ URI: fetched and verified

        started = time.perf_counter()
        allow = True if self.cfg.allow_unsigned else None  # None: RECFB_ALLOW_UNSIGNED decides
        local = resolve(path, allow_unsigned=allow)
        served = ServingBundle(
            load_bundle(local, allow_unsigned=allow, mmap=self.cfg.mmap), self.cfg
        )
        if served.rates is not None:
            served.rates.refresh(self.log)
        old = self.current
        self.current = served
        _freeze_long_lived_objects()
        if old is not None:
            self.metrics.bundle.labels(version=old.version).set(0)  # several workers: a file
            self.metrics.bundle.remove(old.version)
        self.metrics.bundle.labels(version=served.version).set(1)
        log.info(
            "bundle loaded",
            extra={"bundle": served.version, "seconds": round(time.perf_counter() - started, 3)},
        )
        return served

    def swap_in_background(self, path: str) -> bool:
        """Start loading `path`; False if a load is already running."""
        if not self._swap_lock.acquire(blocking=False):
            return False
        self.loading, self.last_error = path, None
        threading.Thread(target=self._swap, args=(path,), name="bundle-swap", daemon=True).start()
        return True

    def _swap(self, path: str) -> None:
        try:
            self.load(path)
        except Exception as exc:  # reported on GET /v1/admin/bundle, old bundle kept
            self.last_error = f"{type(exc).__name__}: {exc}"
            log.error("bundle swap failed", extra={"path": path, "error": self.last_error})
        finally:
            self.loading = None
            self._swap_lock.release()

    def bundle(self) -> ServingBundle:
        """The bundle a request uses (read once per request); 503 before the first load."""
        served = self.current
        if served is None:
            raise HTTPException(503, "no bundle loaded yet (see GET /readyz)")
        return served


def _freeze_long_lived_objects() -> None:
    """A bundle is millions of long-lived objects (id maps); a full GC pass over them stalls
    every request for ~100 ms at 1M items, so they leave the collector's view (refcounting
    still frees a swapped-out bundle; unfreeze lets a cycle go too)."""
    gc.unfreeze()
    gc.collect()
    gc.freeze()


class AliasFollower:
    """Polls the registry alias and swaps to the bundle of the version that holds it."""

    def __init__(self, service: Service, model: str, alias: str, poll_s: float) -> None:
        from recfb import tracking  # mlflow: imported only by a server that follows an alias

        self.service, self.model, self.alias, self.poll_s = service, model, alias, poll_s
        self.tracking_uri = tracking.configure()  # resolved once, not on every poll
        self.version: str | None = None
        self.error: str | None = None

    def lookup(self) -> tuple[str, str] | None:
        """(version, bundle path) holding the alias now; None (and `error`) when unknown."""
        from mlflow import MlflowClient
        from mlflow.exceptions import MlflowException

        try:
            mv = MlflowClient(tracking_uri=self.tracking_uri).get_model_version_by_alias(
                self.model, self.alias
            )
        except MlflowException as exc:
            self.error = f"{self.model}@{self.alias}: {exc}"
            return None
        self.error = None
        return str(mv.version), mv.source

    def poll_once(self) -> None:
        found = self.lookup()
        if found is None:
            return
        from recfb.serving.fetch import resolve

        version, source = found
        current = self.service.current
        if version == self.version and current is not None:
            return
        local = resolve(source)  # a version's source is its model URI: fetched into the cache
        if current is not None and local.resolve() == Path(current.bundle.path).resolve():
            self.version = version
            return
        if self.service.swap_in_background(str(local)):
            log.info("alias moved", extra={"alias": self.alias, "version": version, "path": source})
            self.version = version

    def run(self) -> None:
        while True:
            time.sleep(self.poll_s)
            try:
                self.poll_once()
            except Exception as exc:  # keep following; the error shows on /v1/admin/bundle
                self.error = f"{type(exc).__name__}: {exc}"

    def start(self) -> None:
        threading.Thread(target=self.run, name="alias-follower", daemon=True).start()

    def status(self) -> dict:
        return {
            "model": self.model,
            "alias": self.alias,
            "version": self.version,
            "error": self.error,
        }


DEFAULT_MODEL = "recfb"  # the registered model of pipelines/*.yaml


def newest_bundle(models_dir: str | Path, require_passed: bool = False) -> Path | None:
    """The most recently created bundle in the model store (by manifest created_at) that the
    gate did not reject; with `require_passed`, only one it passed."""
    found = []
    for manifest in Path(models_dir).glob("*/manifest.json"):
        try:
            created = json.loads(manifest.read_text())["created_at"]
        except (OSError, ValueError, KeyError, TypeError):
            continue
        verdict = gate_verdict(manifest.parent)
        if verdict == "rejected" or (require_passed and verdict != "passed"):
            log.info("skipping bundle %s (gate: %s)", manifest.parent.name, verdict or "none")
            continue
        found.append((str(created), manifest.parent))
    return max(found)[1] if found else None


@contextlib.contextmanager
def _quick_registry() -> Iterator[None]:
    """A start-up probe of a remote registry fails fast instead of retrying for minutes."""
    saved = {
        k: os.environ.get(k)
        for k in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT")
    }
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def registry_alias(model: str, alias: str) -> tuple[str, tuple[str, str] | None]:
    """What the registry says about `model@alias`: ('alias', (version, source)); ('model',
    None) when it has the model but not the alias; ('none', None) when there is no tracking
    store or no such model; ('error', None) when it cannot be asked. Never creates a store."""
    uri = os.environ.get("MLFLOW_TRACKING_URI", "sqlite:///mlruns.db")
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).is_file():
        return "none", None
    try:
        from mlflow import MlflowClient
        from mlflow.exceptions import MlflowException

        from recfb import tracking

        with _quick_registry():
            client = MlflowClient(tracking_uri=tracking.configure())
            try:
                client.get_registered_model(model)
            except MlflowException as exc:
                if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
                    return "none", None
                raise
            try:
                mv = client.get_model_version_by_alias(model, alias)
            except MlflowException:
                return "model", None
            return "alias", (str(mv.version), mv.source)
    except Exception as exc:  # mlflow raises its own types per store; serve from models_dir
        log.warning("registry %s cannot be asked for %s@%s: %s", uri, model, alias, exc)
        return "error", None


def startup_bundle(cfg: ServeConfig, follower: AliasFollower | None) -> str | Path | None:
    """The bundle a starting server loads: `cfg.bundle`, else the registry's alias of the
    followed (or default) model, else the newest bundle in `cfg.models_dir` the gate passed
    (or, where no registry knows the model, any it did not reject); None: not ready."""
    if cfg.bundle:
        return cfg.bundle
    model = cfg.follow.model or DEFAULT_MODEL
    state, found = registry_alias(model, cfg.follow.alias)
    if found is not None:
        version, source = found
        if follower is not None:
            follower.version = version
        log.info("serving %s@%s (version %s)", model, cfg.follow.alias, version)
        return source
    path = newest_bundle(cfg.models_dir, require_passed=state != "none")
    if path is None and state != "none":
        log.warning(
            "no %s@%s in the registry and no bundle in %s that passed the gate; pass --bundle "
            "to serve one anyway",
            model,
            cfg.follow.alias,
            cfg.models_dir,
        )
    return path


def start_service(cfg: ServeConfig, api_key: str | None) -> Service:
    """A service with its startup bundle loaded (and the alias followed, when configured)."""
    service = Service(cfg, api_key)
    if cfg.follow.model:
        service.follower = AliasFollower(
            service, cfg.follow.model, cfg.follow.alias, cfg.follow.poll_s
        )
    path = startup_bundle(cfg, service.follower)
    if service.follower is not None:
        service.follower.start()
    if path is not None:
        service.load(path)
    else:
        log.warning("no bundle found; not ready", extra={"models_dir": cfg.models_dir})
    return service
