"""The stages a pipeline runs; each returns what it produced (JSON-able) for the next ones.

Every stage reads what earlier stages wrote (directories, run ids, registry versions), never
their internals, and has a fingerprint of its inputs (``stage_fingerprint``) for skipping.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from recfb.config import load_config
from recfb.pipeline.context import Context, files_fingerprint, fingerprint
from recfb.pipeline.definition import StageSpec
from recfb.pipeline.gate import Vectors, holdout_metrics

DEFAULT_CONF = {
    "etl": "conf/etl.yaml",
    "train": "conf/models/mf.yaml",
    "rank": "conf/rank.yaml",
    "index": "conf/index.yaml",
}
PRODUCTION, CANDIDATE = "production", "candidate"


# --- configs ---------------------------------------------------------------------------------
def _etl_config(spec: StageSpec, ctx: Context):
    from recfb.etl import EtlConfig

    path = Path(spec.config or DEFAULT_CONF["etl"])
    return load_config(EtlConfig, path, [f"out={ctx.dir / 'etl'}", *spec.set])


def _train_config(spec: StageSpec, ctx: Context):
    from recfb.train.config import TrainConfig

    path = Path(spec.config or DEFAULT_CONF["train"])
    base = [f"data={ctx.outputs['etl']['out']}", f"experiment={ctx.spec.experiment}"]
    base.append(f"run_name={ctx.spec.name}:train")
    if spec.init_from == "production":
        prod = _production(ctx)
        if prod is not None and prod.run_id:  # no production model yet: a cold start
            base.append(f"init_from_run={prod.run_id}")
    return load_config(TrainConfig, path, [*base, *spec.set])


def _rank_config(spec: StageSpec, ctx: Context):
    from recfb.rank import RankConfig

    path = Path(spec.config or DEFAULT_CONF["rank"])
    base = [
        f"data={ctx.outputs['etl']['out']}",
        "embedding=run",
        f"embedding_run={ctx.outputs['train']['run_id']}",
        f"experiment={ctx.spec.experiment}",
        f"run_name={ctx.spec.name}:rank",
        f"out={ctx.dir / 'rank'}",
    ]
    return load_config(RankConfig, path, [*base, *spec.set])


def _index_config(spec: StageSpec, ctx: Context):
    from recfb.index import IndexConfig

    path = Path(spec.config or DEFAULT_CONF["index"])
    base = [f"run_id={ctx.outputs['train']['run_id']}"]
    if "rank" in ctx.outputs:
        base.append(f"rank_dir={ctx.outputs['rank']['dir']}")
    return load_config(IndexConfig, path, [*base, *spec.set])


def _production(ctx: Context) -> Any:
    """The registered version that holds the alias `production`, or None."""
    from mlflow.exceptions import MlflowException

    try:
        return ctx.client.get_model_version_by_alias(ctx.spec.registered_model, PRODUCTION)
    except MlflowException:
        return None


def stage_fingerprint(name: str, spec: StageSpec, ctx: Context) -> str:
    """The stage's inputs: its resolved config and the fingerprints of what it reads."""
    fp = ctx.fingerprints
    if name == "etl":
        cfg = _etl_config(spec, ctx)
        # not where it runs: both engines write the same tables (tests/test_distributed.py)
        settings = cfg.model_dump(mode="json", exclude={"engine", "ray"})
        return fingerprint(settings, files_fingerprint(cfg.input.paths))
    if name == "train":
        cfg = _train_config(spec, ctx).model_dump(mode="json")
        cfg.pop("run_name", None)
        return fingerprint(cfg, fp["etl"])
    if name == "rank":
        cfg = _rank_config(spec, ctx).model_dump(mode="json")
        for key in ("run_name", "embedding_run", "out"):
            cfg.pop(key, None)
        return fingerprint(cfg, fp["train"])
    if name == "evaluate":
        prod = _production(ctx)
        token = str(prod.version) if prod else None
        if prod is not None and prod.run_id == ctx.outputs["train"]["run_id"]:
            # our own candidate was promoted since: what it was judged against still holds
            token = ctx.state.get("evaluate", {}).get("outputs", {}).get("production_version")
        return fingerprint(ctx.spec.gate.model_dump(), fp["train"], fp.get("rank"), token)
    if name == "index":
        return fingerprint(spec.model_dump(mode="json"), fp["train"], fp.get("rank"))
    if name == "register":
        return fingerprint(ctx.spec.registered_model, fp["index"])
    if name == "promote":
        return fingerprint(ctx.spec.gate.model_dump(), fp["register"], fp["evaluate"])
    raise ValueError(f"unknown stage {name!r}")


# --- stages ----------------------------------------------------------------------------------
def stage_etl(spec: StageSpec, ctx: Context) -> dict:
    from recfb.etl import run_etl

    cfg = _etl_config(spec, ctx)
    result = run_etl(cfg, quiet=True)
    rec = result.stats["reconciliation"]
    run_id = ctx.child_run("etl")
    ctx.client.log_param(run_id, "out", str(result.out))
    for key in ("rows_in", "rows_used"):
        ctx.client.log_metric(run_id, key, rec[key])
    ctx.client.set_terminated(run_id)
    return {"out": str(Path(result.out).resolve()), "rows_in": rec["rows_in"]}


def stage_train(spec: StageSpec, ctx: Context) -> dict:
    from recfb.recommender import train

    result = train(_train_config(spec, ctx), quiet=True)
    ctx.adopt(result.run_id, "train")
    metrics = {k: v for k, v in result.metrics.items() if k.startswith("test/ndcg@")}
    return {"run_id": result.run_id, "metrics": metrics}


def stage_rank(spec: StageSpec, ctx: Context) -> dict:
    """Fit the two-stage ranker on the ETL's valid window over the train run's vectors."""
    from recfb.rank.publish import fit_rank_stage

    out, info = fit_rank_stage(_rank_config(spec, ctx))
    ctx.adopt(info["run_id"], "rank")
    metrics = {k: v for k, v in info["metrics"].items() if k.startswith("ndcg@")}
    return {"dir": str(out.resolve()), "run_id": info["run_id"], "metrics": metrics}


def _run_vectors(run_id: str) -> Vectors:
    from recfb.train.runs import load_run

    cfg, scorer = load_run(run_id)
    etl = Path(cfg.data)
    users = pl.read_parquet(etl / "users.parquet").sort("user_idx")["user_id"]
    items = pl.read_parquet(etl / "items.parquet").sort("item_idx")["item_id"]
    return Vectors(
        users.cast(pl.String).to_numpy()[: len(scorer.user_vectors)],
        scorer.user_vectors.numpy(),
        items.cast(pl.String).to_numpy()[: len(scorer.item_vectors)],
        scorer.item_vectors.numpy(),
    )


def _has_ranker(bundle: str) -> bool:
    return (Path(bundle) / "ranker.txt").is_file() and (Path(bundle) / "rank.json").is_file()


def _two_stage_lists(etl: str, vectors: Vectors, rank_dir: str | None, gate) -> dict | None:
    """The two-stage lists of a model with a ranker (None: it ranks by inner product)."""
    if rank_dir is None:
        return None
    from recfb.rank.twostage import two_stage_lists

    return two_stage_lists(etl, vectors, rank_dir, gate.k, gate.split)


def stage_evaluate(spec: StageSpec, ctx: Context) -> dict:
    """Candidate and production on the same recent holdout (the candidate's ETL test split)."""
    gate = ctx.spec.gate
    etl = ctx.outputs["etl"]["out"]
    vectors = _run_vectors(ctx.outputs["train"]["run_id"])
    rank_dir = ctx.outputs.get("rank", {}).get("dir")
    where = {"max_users": gate.max_users, "ray": gate.ray if gate.engine == "ray" else None}
    cand = holdout_metrics(
        vectors,
        etl,
        gate.k,
        gate.split,
        lists=_two_stage_lists(etl, vectors, rank_dir, gate),
        **where,
    )
    prod_version = _production(ctx)
    prod = None
    if prod_version is not None:
        from recfb.serving.fetch import resolve

        prod_bundle = str(resolve(prod_version.source))
        prod_vectors = Vectors.from_bundle(prod_bundle)
        prod_rank = prod_bundle if _has_ranker(prod_bundle) else None
        prod = holdout_metrics(
            prod_vectors,
            etl,
            gate.k,
            gate.split,
            lists=_two_stage_lists(etl, prod_vectors, prod_rank, gate),
            **where,
        )
    pops = {
        "candidate": cand.pop("_rec_popularity"),
        "production": prod.pop("_rec_popularity") if prod else [],
    }
    (ctx.dir / "evaluate_popularity.json").write_text(json.dumps(pops))
    run_id = ctx.child_run("evaluate")
    for prefix, metrics in (("candidate", cand), ("production", prod or {})):
        for key, value in metrics.items():
            ctx.client.log_metric(run_id, f"{prefix}/{key.replace('@', '_at_')}", value)
    ctx.client.set_terminated(run_id)
    return {
        "candidate": cand,
        "production": prod,
        "production_version": str(prod_version.version) if prod_version else None,
    }


def stage_index(spec: StageSpec, ctx: Context) -> dict:
    from recfb.index import build_bundle
    from recfb.recommender import Recommender
    from recfb.tracking.pyfunc import log_bundle

    result = build_bundle(_index_config(spec, ctx))
    info = result.manifest["index"]
    run_id = ctx.child_run("index")
    ctx.client.log_metric(run_id, f"recall_at_{info['recall_k']}", info["recall"])
    ctx.client.log_param(run_id, "bundle", str(result.path))
    # the bundle as an MLflow model of the training run: what the registry version points
    # at, so any host that reaches the tracking server can load or serve it
    model_uri = log_bundle(result.path, ctx.outputs["train"]["run_id"], Recommender.load)
    ctx.client.log_param(run_id, "model_uri", model_uri)
    ctx.client.set_terminated(run_id)
    return {
        "bundle": str(Path(result.path).resolve()),
        "recall": info["recall"],
        "model_uri": model_uri,
    }


def stage_register(spec: StageSpec, ctx: Context) -> dict:
    """The bundle becomes a version of the registered model, alias `candidate`."""
    from mlflow.exceptions import MlflowException

    name = ctx.spec.registered_model
    try:
        ctx.client.get_registered_model(name)
    except MlflowException:
        ctx.client.create_registered_model(name, description="recfb model bundles")
    bundle = ctx.outputs["index"]["bundle"]
    version = ctx.client.create_model_version(
        name,
        source=ctx.outputs["index"]["model_uri"],
        run_id=ctx.outputs["train"]["run_id"],
        tags={"bundle": Path(bundle).name, "pipeline": ctx.spec.name},
    )
    ctx.client.set_registered_model_alias(name, CANDIDATE, version.version)
    run_id = ctx.child_run("register")
    ctx.client.log_param(run_id, "version", version.version)
    ctx.client.set_terminated(run_id)
    return {"version": str(version.version), "bundle": bundle}


def gate_decision(gate, cand: dict, prod: dict | None) -> tuple[bool, str]:
    """Pass when not worse than production on the primary metric beyond the tolerance and not
    showing more disliked/refunded items (beyond its tolerance)."""
    key, neg = f"{gate.primary}@{gate.k}", f"negative_share@{gate.k}"
    if prod is None:
        return True, "no production model yet"
    if cand[key] < prod[key] - gate.tolerance:
        return False, f"{key} {cand[key]:.4f} < production {prod[key]:.4f} - {gate.tolerance}"
    if cand[neg] > prod[neg] + gate.negative_share_tolerance:
        return False, (
            f"{neg} {cand[neg]:.4f} > production {prod[neg]:.4f} + {gate.negative_share_tolerance}"
        )
    return True, f"{key} {cand[key]:.4f} vs production {prod[key]:.4f}; {neg} not raised"


def stage_promote(spec: StageSpec, ctx: Context) -> dict:
    """Move `production` to the candidate when the gate passes; log the verdict either way."""
    ev, version = ctx.outputs["evaluate"], ctx.outputs["register"]["version"]
    passed, reason = gate_decision(ctx.spec.gate, ev["candidate"], ev["production"])
    name = ctx.spec.registered_model
    if passed:
        ctx.client.set_registered_model_alias(name, PRODUCTION, version)
    ctx.client.set_model_version_tag(name, version, "gate", "passed" if passed else "rejected")
    ctx.client.set_model_version_tag(name, version, "gate_reason", reason)
    bundle = Path(ctx.outputs["register"]["bundle"])
    if (bundle / "manifest.json").is_file():  # serve's default bundle: never a rejected one
        from recfb.index.bundle import write_gate_verdict

        write_gate_verdict(bundle, passed, reason, name, version)
    run_id = ctx.child_run("promote", {"recfb.gate": "passed" if passed else "rejected"})
    ctx.client.log_param(run_id, "decision", "promoted" if passed else "rejected")
    ctx.client.log_param(run_id, "reason", reason[:500])
    ctx.client.log_metric(run_id, "passed", float(passed))
    ctx.client.set_terminated(run_id)
    return {"passed": passed, "reason": reason, "version": version}


# --- the report -----------------------------------------------------------------------------
def write_report(ctx: Context, records: dict) -> Path:
    """Markdown with PNGs: stages, data volumes and quarantine reasons, metric deltas against
    production, the popularity of recommended items, delay fits; logged to the parent run."""
    from recfb.tracking.plots import plt

    out = ctx.dir / "reports" / ctx.parent
    out.mkdir(parents=True, exist_ok=True)
    lines = [
        f"# Pipeline `{ctx.spec.name}`, run {ctx.parent}",
        "",
        "| stage | status | seconds |",
        "|---|---|---:|",
    ]
    lines += [f"| {n} | {r.status} | {r.seconds:.1f} |" for n, r in records.items()]
    etl = ctx.outputs.get("etl", {}).get("out")
    if etl and (Path(etl) / "stats.json").is_file():
        rec = json.loads((Path(etl) / "stats.json").read_text())["reconciliation"]
        lines += [
            "",
            "## Data",
            "",
            f"- events in: {rec['rows_in']:,}; used: {rec['rows_used']:,}",
            f"- quarantined: {rec['quarantined'] or 'none'}",
            f"- filtered: {rec['filtered'] or 'none'}",
            f"- duplicates removed: {rec['duplicates_removed']}",
        ]
    ev = ctx.outputs.get("evaluate")
    if ev:
        lines += [
            "",
            "## Candidate against production (same holdout)",
            "",
            "| metric | candidate | production | delta |",
            "|---|---:|---:|---:|",
        ]
        for key, value in ev["candidate"].items():
            prod = (ev["production"] or {}).get(key)
            delta = f"{value - prod:+.4f}" if prod is not None else "-"
            prod_text = f"{prod:.4f}" if prod is not None else "-"
            lines.append(f"| {key} | {value:.4f} | {prod_text} | {delta} |")
        pops_path = ctx.dir / "evaluate_popularity.json"
        if pops_path.is_file():
            pops = json.loads(pops_path.read_text())
            fig, ax = plt.subplots(figsize=(6, 3.5))
            for label, values in pops.items():
                if values:
                    ax.hist(np.log10(np.asarray(values) + 1e-7), bins=40, alpha=0.5, label=label)
            ax.set(title="popularity of recommended items", xlabel="log10 share of positives")
            ax.legend()
            fig.tight_layout()
            fig.savefig(out / "popularity.png", dpi=100)
            plt.close(fig)
            lines += ["", "![popularity of recommended items](popularity.png)"]
    promote = ctx.outputs.get("promote")
    if promote:
        verdict = "promoted to production" if promote["passed"] else "rejected (stays candidate)"
        lines += [
            "",
            "## Gate",
            "",
            f"Version {promote['version']}: **{verdict}**: {promote['reason']}",
        ]
    train = ctx.outputs.get("train")
    if train:
        try:
            from recfb import tracking

            png = tracking.download(train["run_id"], "delays/delay_curves.png")
            (out / "delay_curves.png").write_bytes(png.read_bytes())
            lines += ["", "## Delay fits", "", "![delay curves](delay_curves.png)"]
        except Exception:  # a log without a conversion cascade has no delay fits
            pass
    (out / "report.md").write_text("\n".join(lines) + "\n")
    ctx.client.log_artifacts(ctx.parent, str(out), "report")
    return out / "report.md"
