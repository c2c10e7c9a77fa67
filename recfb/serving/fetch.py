"""Where a bundle comes from: a local directory, or an MLflow model URI fetched into a cache.

`recfb serve --bundle models:/recfb@production` (or `models:/recfb/3`, `runs:/<id>/model`,
`models:/m-<id>`) resolves the URI to one model version, downloads the logged model from the
tracking server's artifact store into `$RECFB_CACHE_DIR/models/<key>` (default
`~/.cache/recfb`), verifies every file against the bundle's manifest checksums, and serves
that directory. A second start finds the verified copy and downloads nothing; a copy that
fails its checksums is fetched again, and a download that fails them is refused. The bundle's
signature is checked like a local bundle's (`recfb.index.bundle`): the serving host needs the
publishing host's key (`RECFB_BUNDLE_KEY`).
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
from pathlib import Path

from recfb.errors import RecfbError

log = logging.getLogger(__name__)
MODEL_URI = re.compile(r"^(models|runs):/")


def is_model_uri(location: str | Path) -> bool:
    return bool(MODEL_URI.match(str(location)))


def cache_root() -> Path:
    return Path(os.environ.get("RECFB_CACHE_DIR", Path.home() / ".cache" / "recfb")) / "models"


def resolve(location: str | Path, allow_unsigned: bool | None = None) -> Path:
    """A bundle directory for a path or an MLflow model URI (downloaded and verified)."""
    if not is_model_uri(location):
        return Path(location)
    uri, key = concrete_uri(str(location))
    return fetch(uri, key, allow_unsigned)


def concrete_uri(uri: str) -> tuple[str, str]:
    """(a URI naming one immutable model, a cache key for it): an alias or a version of a
    registered model becomes its version's source (the logged model)."""
    from mlflow import MlflowClient

    from recfb.tracking import configure

    configure()
    match = re.match(r"^models:/([^/@]+)(?:@([^/]+)|/(\d+))/?$", uri)
    if match and not match.group(1).startswith("m-"):
        name, alias, number = match.groups()
        client = MlflowClient()
        try:
            version = (
                client.get_model_version_by_alias(name, alias)
                if alias
                else client.get_model_version(name, number)
            )
        except Exception as exc:  # mlflow raises its own exception types per store
            raise RecfbError(f"{uri}: no such registered model version ({exc})") from exc
        source = version.source
        model_id = getattr(version, "model_id", None) or f"{name}-v{version.version}"
        return (source if is_model_uri(source) else uri), _safe(model_id)
    return uri, _safe(uri.split(":/", 1)[1])


def fetch(uri: str, key: str, allow_unsigned: bool | None = None) -> Path:
    """The verified bundle of model `uri`, downloaded once into the cache under `key`."""
    from mlflow.artifacts import download_artifacts

    from recfb.index.bundle import BundleError, verify

    target = cache_root() / key
    if target.is_dir():
        try:
            bundle = bundle_in(target, uri)
            verify(bundle, required=(), allow_unsigned=allow_unsigned)
            return bundle
        except (BundleError, RecfbError) as exc:
            log.warning("cached copy of %s fails verification (%s); fetching again", uri, exc)
            shutil.rmtree(target, ignore_errors=True)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=target.parent))
    try:
        # a run's artifact path lands in a subdirectory named after it; a model URI does not
        try:
            model_dir = Path(download_artifacts(artifact_uri=uri, dst_path=str(tmp / "download")))
        except Exception as exc:  # mlflow raises its own types per store; name the model
            raise RecfbError(
                f"{uri}: cannot fetch the model ({type(exc).__name__}: {exc}); runs trained "
                "before models were logged have none: train again, or pass a bundle directory"
            ) from exc
        bundle = bundle_in(model_dir, uri)
        verify(bundle, required=(), allow_unsigned=allow_unsigned)
        os.replace(model_dir, tmp / "model")
        shutil.rmtree(tmp / "download", ignore_errors=True)
        os.replace(tmp / "model", target)
        shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("fetched %s into %s", uri, target)
    return bundle_in(target, uri)


def bundle_in(model_dir: Path, uri: str) -> Path:
    """The bundle inside a downloaded pyfunc model (`artifacts/<bundle name>/`)."""
    found = [m.parent for m in (model_dir / "artifacts").glob("*/manifest.json")]
    if len(found) != 1:
        raise RecfbError(
            f"{uri}: not a recfb model (expected one bundle under artifacts/, found {len(found)})"
        )
    return found[0]


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", text).strip("._") or "model"
