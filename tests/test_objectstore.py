"""ETL inputs in an object store: `s3://bucket/prefix/*.parquet` against a real S3 HTTP
endpoint (moto's server on 127.0.0.1), configured the way every AWS tool is (environment),
read by both engines into the same tables as the same files on disk."""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl
import pytest

from conftest import CONF, _started_or_skip, free_port

BUCKET = "shop-events"


@pytest.fixture(scope="module")
def s3_env():
    """A real S3 endpoint (moto's threaded server) with an empty bucket; the AWS settings a
    user would export, set in this process for the test's duration and returned for commands
    the test starts."""
    pytest.importorskip("s3fs", reason="s3fs is not installed: pip install 'recfb[s3]'")

    def start():
        from moto.server import ThreadedMotoServer

        port = free_port()
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
        server.start()
        return server, port

    server, port = _started_or_skip("moto.server", "dev", "S3 endpoint (moto)", start)
    env = {
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
        "AWS_ALLOW_HTTP": "true",
        "AWS_REGION": "us-east-1",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ACCESS_KEY_ID": "recfb-test",
        "AWS_SECRET_ACCESS_KEY": "recfb-test-secret",
    }
    with pytest.MonkeyPatch.context() as patch:
        for name, value in env.items():
            patch.setenv(name, value)
        import boto3

        boto3.client("s3").create_bucket(Bucket=BUCKET)
        yield env
        server.stop()


def _shop_files(base: Path) -> list[Path]:
    """A simulated shop in parquet parts, plus a CSV file with one ragged record (the
    reader's slow path opens the object itself)."""
    from recfb.simulate import SimConfig, simulate

    simulate(SimConfig(seed=5, n_users=400, n_items=150, n_events=20_000), base / "sim")
    events = pl.read_parquet(base / "sim" / "events")
    files = []
    for i in range(3):
        path = base / "local" / f"part-{i}.parquet"
        path.parent.mkdir(parents=True, exist_ok=True)
        events.slice(i * 6_000, 6_000).write_parquet(path)
        files.append(path)
    text = base / "local" / "late.csv"
    events.slice(18_000).write_csv(text)
    with text.open("a") as fh:
        fh.write("1,2,3,view,2024-01-01,,,,,a-field-too-many\n")
    return [*files, text]


def _upload(files: list[Path], prefix: str) -> None:
    import boto3

    s3 = boto3.client("s3")
    for path in files:
        s3.upload_file(str(path), BUCKET, f"{prefix}/{path.name}")


def _etl(paths: list[str], out: Path, **extra) -> dict:
    from recfb.config import build_model
    from recfb.etl import EtlConfig, run_etl

    cfg = {
        "input": {"paths": paths},
        "signals": str(CONF / "signals" / "simulator.yaml"),
        "out": str(out),
    } | extra
    return run_etl(build_model(EtlConfig, cfg, "t"), True).stats


def _same_tables(a: Path, b: Path, local_dir: Path, uri: str) -> None:
    """Every table equal, with the store's URIs where the local run has the files' paths."""
    for path in sorted(a.glob("*.parquet")):
        x, y = pl.read_parquet(path), pl.read_parquet(b / path.name)
        if "source_file" in x.columns:
            x = x.with_columns(
                pl.col("source_file").cast(pl.String).str.replace(str(local_dir), uri, literal=True)
            )
            y = y.with_columns(pl.col("source_file").cast(pl.String))
        assert x.equals(y), path.name


def test_the_etl_reads_an_object_store_glob_as_the_same_files_on_disk(s3_env, tmp_path):
    files = _shop_files(tmp_path)
    _upload(files, "events/2026-12-07")
    _upload(files[:1], "elsewhere")  # not under the glob
    on_disk = _etl([str(f) for f in files], tmp_path / "from-disk")
    in_store = _etl(
        [f"s3://{BUCKET}/events/*/*.parquet", f"s3://{BUCKET}/events/2026-12-07/late.csv"],
        tmp_path / "from-store",
    )
    uri = f"s3://{BUCKET}/events/2026-12-07"
    assert in_store["inputs"] == [f"{uri}/{f.name}" for f in files]
    rec = in_store["reconciliation"]
    assert rec["balanced"] and rec["quarantined"] == {"ragged_row": 1}
    assert rec == on_disk["reconciliation"]
    _same_tables(tmp_path / "from-disk", tmp_path / "from-store", tmp_path / "local", uri)
    quarantine = pl.read_parquet(tmp_path / "from-store" / "quarantine.parquet")
    assert quarantine["source_file"].to_list() == [f"{uri}/late.csv"]

    # a prefix lists every event file under it, the same inputs as the glob and the file
    by_prefix = _etl([f"s3://{BUCKET}/events/"], tmp_path / "by-prefix")
    assert by_prefix["inputs"] == sorted(in_store["inputs"])  # listed in URI order


def test_an_object_store_input_that_matches_nothing_is_named(s3_env, tmp_path):
    from recfb.errors import InputError

    with pytest.raises(InputError, match=rf"file s3://{BUCKET}/no-such/\*\.parquet: no object"):
        _etl([f"s3://{BUCKET}/no-such/*.parquet"], tmp_path / "out")
    with pytest.raises(InputError, match="cannot list the object store"):
        _etl(["s3://no-such-bucket-here/events/"], tmp_path / "out")


def test_a_pipeline_fingerprints_objects_by_their_version(s3_env, tmp_path):
    """The ETL stage runs again when an object is rewritten, not when it is only listed
    again."""
    from recfb.pipeline.context import files_fingerprint

    files = _shop_files(tmp_path)
    _upload(files[:2], "fp")
    spec = [f"s3://{BUCKET}/fp/*.parquet"]
    first = files_fingerprint(spec)
    assert files_fingerprint(spec) == first and len(first) == 2
    _upload(files[2:3], "fp")  # a new object under the glob
    assert len(files_fingerprint(spec)) == 3
    import boto3

    pl.read_parquet(files[0]).head(10).write_parquet(tmp_path / "rewritten.parquet")
    boto3.client("s3").upload_file(str(tmp_path / "rewritten.parquet"), BUCKET, "fp/part-0.parquet")
    again = dict((u, (s, v)) for u, s, v in files_fingerprint(spec))
    was = dict((u, (s, v)) for u, s, v in first)
    name = f"s3://{BUCKET}/fp/part-0.parquet"
    assert again[name] != was[name]
    assert again[f"s3://{BUCKET}/fp/part-1.parquet"] == was[f"s3://{BUCKET}/fp/part-1.parquet"]


def test_the_etl_on_ray_reads_the_object_store(s3_env, ray_cluster, tmp_path):
    """`recfb etl --engine ray` on a store's glob: the workers read the objects (the
    driver's AWS settings forwarded), the tables equal the local engine's."""
    from test_distributed import recfb

    files = _shop_files(tmp_path)
    _upload(files, "ray")
    glob = f"s3://{BUCKET}/ray/*"
    _etl([glob], tmp_path / "local-engine")
    done = recfb(
        "etl",
        "-i",
        glob,
        "-o",
        str(tmp_path / "ray-engine"),
        "--signals",
        str(CONF / "signals" / "simulator.yaml"),
        "--engine",
        "ray",
        "--address",
        ray_cluster.address,
        env=s3_env,
        cwd=CONF.parent,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    stats = json.loads((tmp_path / "ray-engine" / "stats.json").read_text())
    assert stats["engine"]["name"] == "ray"
    for path in sorted((tmp_path / "local-engine").glob("*.parquet")):
        assert pl.read_parquet(path).equals(pl.read_parquet(tmp_path / "ray-engine" / path.name))
