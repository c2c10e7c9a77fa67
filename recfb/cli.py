"""The `recfb` command line. Every command has --help with an example."""

from __future__ import annotations

import json
import math
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from recfb.errors import RecfbError

app = typer.Typer(
    help="recfb: a recommender engine for ordered, noisy, delayed multi-signal feedback.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode="markdown",
)
out = Console()

ConfigOpt = Annotated[
    Path | None, typer.Option("--config", "-c", help="YAML config file (see conf/).")
]
SetOpt = Annotated[
    list[str] | None,
    typer.Option("--set", "-s", help="Override any config key: --set split.test_frac=0.2"),
]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress display.")]


def _print_error(message: str) -> None:
    """One error line on stderr; the message is escaped so '[...]' in it is shown, not parsed."""
    Console(stderr=True, soft_wrap=True).print(
        f"[bold red]error:[/] {escape(message)}", highlight=False
    )


def _fail(exc: Exception) -> None:
    _print_error(str(exc))
    raise typer.Exit(code=2)


def print_etl_summary(stats: dict[str, Any]) -> None:
    """Reconciliation and per-split volumes as tables."""
    rec = stats["reconciliation"]
    t = Table(title="Reconciliation", show_header=True)
    t.add_column("rows")
    t.add_column("count", justify="right")
    t.add_row("in", f"{rec['rows_in']:,}")
    t.add_row("used", f"{rec['rows_used']:,}")
    for kind in ("quarantined", "duplicates_removed", "filtered"):
        for reason, n in rec[kind].items():
            t.add_row(f"{kind}: {reason}", f"{n:,}")
    t.add_row("balanced", "yes" if rec["balanced"] else "[red]NO[/]")
    out.print(t)
    splits = stats["splits"]
    s = Table(title=f"Splits ({stats['split']['method']})")
    s.add_column("")
    for name in splits:
        s.add_column(name, justify="right")
    for key in ("events", "pairs", "users", "items"):
        s.add_row(key, *(f"{d[key]:,}" for d in splits.values()))
    for label in stats["levels"].values():
        s.add_row(
            f"pairs: {label}", *(f"{d['pairs_per_label'].get(label, 0):,}" for d in splits.values())
        )
    s.add_row(
        "matured",
        *(
            f"{d['matured_share']:.0%}" if d["matured_share"] is not None else "-"
            for d in splits.values()
        ),
    )
    out.print(s)
    d = stats["delays_s"]
    for name, q in d.items():
        if q["count"]:
            out.print(
                f"{name} delay: n={q['count']:,}, median {q['p50'] / 3600:.2f} h, "
                f"p90 {q['p90'] / 3600:.2f} h"
            )


@app.command()
def etl(
    config: ConfigOpt = Path("conf/etl.yaml"),
    input_paths: Annotated[
        list[str] | None,
        typer.Option("--input", "-i", help="Input files, globs or directories (repeatable)."),
    ] = None,
    signals: Annotated[str | None, typer.Option(help="Signal map YAML.")] = None,
    output: Annotated[str | None, typer.Option("--out", "-o", help="Output directory.")] = None,
    overrides: SetOpt = None,
    quiet: QuietOpt = False,
    engine: EngineOpt = None,
    address: AddressOpt = None,
) -> None:
    """Validate, canonicalise, fold and split raw events into training data.

    Example: `recfb etl -c conf/datasets/taobao.yaml --set split.method=leave_last_out`;
    on a Ray cluster: `recfb etl --engine ray --address 10.0.0.5:6379` (the same output).
    """
    from recfb.config import load_config
    from recfb.etl import EtlConfig, run_etl

    sets = list(overrides or []) + _engine_sets(engine, address)
    if input_paths:
        sets.append(f"input.paths={input_paths!r}")
    if signals:
        sets.append(f"signals={signals}")
    if output:
        sets.append(f"out={output}")
    try:
        cfg = load_config(EtlConfig, config, sets, env_prefix="RECFB_ETL")
        result = run_etl(cfg, quiet=quiet)
    except RecfbError as exc:
        _fail(exc)
        return
    print_etl_summary(result.stats)
    out.print(f"wrote {result.out}")


EngineOpt = Annotated[
    str | None,
    typer.Option(help="local (this process) or ray (a Ray cluster); default: the config's."),
]
AddressOpt = Annotated[
    str | None,
    typer.Option(help="Ray head host:port or `auto`; default: a private local cluster."),
]


def _engine_sets(engine: str | None, address: str | None) -> list[str]:
    """`--engine` / `--address` as config overrides (`engine`, `ray.address`)."""
    sets = []
    if engine is not None:
        sets.append(f"engine={engine}")
    if address is not None:
        sets.append(f"ray.address={address}")
    return sets


@app.command()
def simulate(
    config: ConfigOpt = Path("conf/simulate.yaml"),
    output: Annotated[str, typer.Option("--out", "-o", help="Output directory.")] = "data/sim",
    overrides: SetOpt = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing output.")] = False,
    quiet: QuietOpt = False,
) -> None:
    """Simulate users, items and a view->click->cart->purchase->refund funnel with known truth.

    Example: `recfb simulate --set n_events=10000000 --set noise_positive_share=0.2 -o data/sim10m`
    """
    from recfb.config import load_config
    from recfb.simulate import SimConfig
    from recfb.simulate import simulate as run_simulation

    try:
        cfg = load_config(SimConfig, config if config and config.exists() else None, overrides)
        with out.status("simulating ..."):
            result = run_simulation(cfg, output, overwrite=overwrite)
    except (RecfbError, FileExistsError) as exc:
        _fail(exc)
        return
    out.print(result)


@app.command()
def demo(
    output: Annotated[Path, typer.Option("--out", "-o", help="Working directory.")] = Path("data"),
    fresh: Annotated[bool, typer.Option(help="Re-simulate even if events exist.")] = False,
    epochs: Annotated[int, typer.Option(help="Training epochs of the demo model.")] = 8,
    serve_api: Annotated[
        bool, typer.Option("--serve/--no-serve", help="Start the API on the new bundle.")
    ] = True,
    port: Annotated[int, typer.Option(help="Port of the API.")] = 8000,
) -> None:
    """The main job on the bundled default: simulate events, run the nightly pipeline (ETL,
    train and evaluate MF-BPR, index into a bundle, register it in MLflow, promote it through
    the gate), write recommendations, then serve the `production` bundle over HTTP, following
    the alias so that a later pipeline run's promotion is picked up.

    Example: `recfb demo --fresh --epochs 3 --port 8080`
    """
    import os
    import secrets

    from mlflow import MlflowClient

    from recfb import tracking
    from recfb.config import load_config
    from recfb.pipeline import load_pipeline, run_pipeline
    from recfb.recommender import Recommender
    from recfb.serving import ServeConfig
    from recfb.serving import serve as run_server
    from recfb.serving.fetch import resolve
    from recfb.simulate import SimConfig
    from recfb.simulate import simulate as run_simulation

    try:
        sim_dir = output / "sim"
        if fresh or not (sim_dir / "events").exists():
            # the simulated log ends now, so the service's recent-traffic rates have data
            days = load_config(SimConfig, Path("conf/simulate.yaml")).days
            start = datetime.now(UTC).replace(minute=0, second=0, microsecond=0, tzinfo=None)
            start -= timedelta(days=days)
            cfg = load_config(
                SimConfig, Path("conf/simulate.yaml"), [f"start='{start.isoformat()}'"]
            )
            with out.status("simulating the default shop ..."):
                result = run_simulation(cfg, sim_dir, overwrite=True)
            out.print(result)
        spec = load_pipeline(Path("pipelines/nightly.yaml"))
        spec.work_dir = str(output / "pipelines")
        spec.stages["etl"].set = [f"input.paths=['{sim_dir / 'events'}']"]
        spec.stages["train"].set.append(f"trainer.max_epochs={epochs}")
        with out.status("running the nightly pipeline (etl -> train -> ... -> promote) ..."):
            result = run_pipeline(spec, Path("pipelines/nightly.yaml").read_text())
        etl_dir = Path(result.stages["etl"].outputs["out"])
        print_etl_summary(json.loads((etl_dir / "stats.json").read_text()))
        run_id = result.stages["train"].outputs["run_id"]
        tracking.configure()
        client = MlflowClient()
        print_metrics(
            client.get_run(run_id).data.metrics, f"MF-BPR on the default shop: run {run_id}"
        )
        print_pipeline(result)
        # the production model, as any host would load it from the registry: its lists are
        # the ones the service answers with (two-stage where the pipeline ranks)
        production = client.get_model_version_by_alias(spec.registered_model, "production")
        bundle = resolve(production.source)
        served = Recommender.load(bundle)
        ids = served.user_ids()[:3]
        recs = served.recommend([*ids, "a-new-visitor"], 5)
        path = output / "recommendations.parquet"
        path.parent.mkdir(parents=True, exist_ok=True)
        recs.write_parquet(path)
        out.print(recs)
        out.print(f"wrote {path}")
        out.print(
            f"alias production -> {spec.registered_model} v{production.version} "
            f"({production.source}, cached at {bundle})\n"
            "Review the runs: mlflow ui --backend-store-uri sqlite:///mlruns.db "
            "(then open http://127.0.0.1:5000)\n"
            "Refresh from the events posted to the service: "
            "recfb pipeline run pipelines/hourly.yaml"
        )
        if not serve_api:
            return
        key = os.environ.get("RECFB_API_KEY") or secrets.token_urlsafe(12)
        serve_cfg = load_config(
            ServeConfig,
            Path("conf/serve.yaml"),
            [
                f"bundle={bundle}",
                f"port={port}",
                "log_level=warning",
                f"follow.model={spec.registered_model}",  # swaps when a pipeline promotes
            ],
        )
        base = f"http://127.0.0.1:{port}"
        out.print(
            f"\n[bold]Serving {bundle.name} on {base}[/] (Ctrl-C to stop). Try:\n"
            f"  curl '{base}/v1/users/{ids[0]}/recommendations?k=5'\n"
            f"  curl '{base}/v1/users/a-new-visitor/recommendations?k=5'\n"
            f"  curl '{base}/v1/items/{recs['item_id'][0]}/rates'   (delay-corrected CVR)\n"
            f"  curl -X POST {base}/v1/events -H 'X-API-Key: {key}' "
            '-H \'Content-Type: application/json\' -d \'{"events": [{"event_id": "e1", '
            f'"user_id": "a-new-visitor", "item_id": "{recs["item_id"][0]}", '
            '"event": "click"}]}\'\n'
            f"  open {base}/docs (OpenAPI), {base}/metrics (Prometheus)",
            highlight=False,
            soft_wrap=True,  # commands must stay copy-pasteable, never wrapped
        )
        run_server(serve_cfg, key)
    except RecfbError as exc:
        _fail(exc)
        return


def print_metrics(metrics: dict[str, float], title: str, show: str = "test") -> None:
    t = Table(title=title)
    t.add_column("metric")
    t.add_column("value", justify="right")
    for key, value in metrics.items():
        split, _, name = key.partition("/")
        if split != show or "/" in name and not name.startswith("auc/") or "n_users" in name:
            continue  # other splits, per-level and counts are in MLflow: keep the terminal short
        t.add_row(key, f"{value:.4f}")
    out.print(t)


@app.command()
def train(
    config: ConfigOpt = Path("conf/models/mf.yaml"),
    overrides: SetOpt = None,
    quiet: QuietOpt = False,
    engine: EngineOpt = None,
    address: AddressOpt = None,
) -> None:
    """Train a model (mf, lightgcn, gnolr) or fit a baseline (popularity, itemknn, als,
    bpr_implicit) on an ETL output; evaluate it; record the run in MLflow. `--engine ray`
    trains an embedding model with DDP over Ray Train workers (`--set ray.workers=N`).

    Example: `recfb train -c conf/models/gnolr.yaml --set data=data/etl --set trainer.max_epochs=5`
    """
    from recfb.config import load_config
    from recfb.recommender import train as run_training
    from recfb.train.config import TrainConfig

    try:
        sets = list(overrides or []) + _engine_sets(engine, address)
        cfg = load_config(TrainConfig, config, sets, env_prefix="RECFB_TRAIN")
        result = run_training(cfg, quiet=quiet)
    except RecfbError as exc:
        _fail(exc)
        return
    print_metrics(result.metrics, f"{cfg.model.family}: run {result.run_id}")
    out.print(f"MLflow run id: {result.run_id}")


@app.command()
def evaluate(
    run_id: Annotated[str, typer.Option("--run-id", help="MLflow run id of a trained model.")],
    split: Annotated[str, typer.Option(help="valid or test.")] = "test",
    overrides: SetOpt = None,
) -> None:
    """Evaluate a trained run again (e.g. with another exclusion rule); logs a new MLflow run.

    Example: `recfb evaluate --run-id 0123abcd --set eval.exclude=none`
    """
    from recfb.train.evaluate_run import evaluate_run

    try:
        new_run, metrics = evaluate_run(run_id, split, list(overrides or []))
    except RecfbError as exc:
        _fail(exc)
        return
    print_metrics(metrics, f"{split}: evaluation run {new_run} of {run_id}", show=split)


@app.command()
def recommend(
    run_id: Annotated[
        str | None, typer.Option("--run-id", help="MLflow run whose logged model to use.")
    ] = None,
    model: Annotated[
        str | None,
        typer.Option(
            "--model",
            help="A saved model directory or an MLflow model URI (models:/recfb@production).",
        ),
    ] = None,
    output: Annotated[Path, typer.Option("--out", "-o", help="Parquet file to write.")] = Path(
        "data/recommendations.parquet"
    ),
    users: Annotated[
        Path | None, typer.Option(help="Text file with one external user id per line; default all.")
    ] = None,
    k: Annotated[int, typer.Option("-k", help="Items per user.")] = 20,
    engine: Annotated[
        str, typer.Option(help="local (this process) or ray (a pool of Ray actors).")
    ] = "local",
    address: Annotated[
        str | None,
        typer.Option(help="Ray head host:port or `auto`; default: a private local cluster."),
    ] = None,
    workers: Annotated[int, typer.Option(help="Ray actors scoring at once.")] = 2,
) -> None:
    """Top-k items per user from any fitted model (every family: embedding models, baselines,
    the two-stage recommender), with the signal map's exclusion rule; unknown users get the
    most popular items. `--engine ray` scores the users on a Ray cluster: the same lists.

    Example: `recfb recommend --run-id 0123abcd --users users.txt -k 50 -o recs.parquet`
    """
    from recfb.recommender import Recommender
    from recfb.serving.fetch import resolve

    try:
        if (run_id is None) == (model is None):
            raise RecfbError("recommend: give exactly one of --run-id or --model")
        if engine not in ("local", "ray"):
            raise RecfbError(f"recommend: --engine must be local or ray, not {engine!r}")
        location = f"runs:/{run_id}/model" if run_id else str(model)
        fitted = Recommender.load(resolve(location))
        ids = (
            [line.strip() for line in users.read_text().splitlines() if line.strip()]
            if users
            else fitted.user_ids()
        )
        if engine == "ray":
            from recfb.distributed import RayConfig
            from recfb.distributed.recommend import recommend_on_ray

            frame = recommend_on_ray(location, ids, k, RayConfig(address=address, workers=workers))
        else:
            frame = fitted.recommend(ids, k)
        output.parent.mkdir(parents=True, exist_ok=True)
        frame.write_parquet(output)
    except RecfbError as exc:
        _fail(exc)
        return
    fallback = frame.filter(frame["source"] == "popularity")["user_id"].n_unique()
    out.print(
        f"wrote {frame.height:,} rows for {frame['user_id'].n_unique():,} users "
        f"({fallback:,} by popularity fallback) to {output}"
    )


@app.command()
def index(
    run_id: Annotated[str, typer.Option("--run-id", help="MLflow run id of a trained model.")],
    config: ConfigOpt = Path("conf/index.yaml"),
    overrides: SetOpt = None,
) -> None:
    """Build the FAISS index of a run's item vectors, measure its recall against exact
    search, and publish a verified model bundle into the model store (models/).

    Example: `recfb index --run-id 0123abcd --set factory=HNSW32,Flat --set ef_search=256`
    """
    from recfb.config import load_config
    from recfb.index import IndexConfig, build_bundle

    try:
        cfg = load_config(IndexConfig, config, [*(overrides or []), f"run_id={run_id}"])
        with out.status("building the index and the bundle ..."):
            result = build_bundle(cfg)
    except RecfbError as exc:
        _fail(exc)
        return
    info = result.manifest["index"]
    out.print(
        f"bundle {result.path}: {result.manifest['n_items']:,} items, {info['factory']} "
        f"({info['device']}), recall@{info['recall_k']} {info['recall']:.4f} "
        f"against exact search, built in {info['build_s']:.1f} s"
    )


@app.command()
def delays(
    etl_dir: Annotated[Path, typer.Option("--etl", help="An ETL output directory.")],
    cutoff: Annotated[
        str | None, typer.Option(help="'Now' (UTC ISO time); default: the end of the log.")
    ] = None,
    output: Annotated[Path, typer.Option("--out", "-o", help="Directory for the results.")] = Path(
        "delays"
    ),
    segment: Annotated[str, typer.Option(help="Item column to fit per segment ('' = none).")] = (
        "category"
    ),
) -> None:
    """Fit the click -> purchase and purchase -> refund delay models of an ETL output with
    right censoring (exponential, Weibull, log-normal cure models; the lowest AIC wins), per
    segment with shrinkage; writes delays.json and delay_curves.png (Kaplan-Meier beside the
    fits).

    Example: `recfb delays --etl data/etl-taobao --cutoff 2017-12-03T00:00:00 -o delays-taobao`
    """
    from recfb.delayed.fit import fit_delays
    from recfb.delayed.plots import delay_curves
    from recfb.io import write_json
    from recfb.simulate.config import parse_utc, to_epoch_ms
    from recfb.tracking.plots import plt

    try:
        cut = to_epoch_ms(parse_utc(cutoff)) if cutoff else None
        with out.status("fitting delay models ..."):
            fits = fit_delays(etl_dir, cutoff_ms=cut, segment=segment or None)
    except (RecfbError, ValueError) as exc:
        _fail(exc if isinstance(exc, RecfbError) else RecfbError(str(exc)))
        return
    output.mkdir(parents=True, exist_ok=True)
    write_json(output / "delays.json", fits.to_dict())
    fig = delay_curves(fits)
    fig.savefig(output / "delay_curves.png", dpi=110)
    plt.close(fig)
    table = Table(title=f"delay models of {etl_dir}")
    for col in ("stage", "family", "AIC", "P(outcome)", "median h", "shape", "chosen"):
        table.add_column(col)
    for stage, model in (
        ("click -> purchase", fits.conversion),
        ("purchase -> refund", fits.refund),
    ):
        if model is None:
            continue
        for fam, fit in model.candidates.items():
            table.add_row(
                stage,
                fam,
                f"{fit.aic:,.0f}",
                f"{fit.p:.4f}",
                f"{fit.median_s() / 3600:.2f}",
                f"{math.exp(fit.log_shape):.2f}" if fam != "exponential" else "-",
                "*" if fam == model.overall.family else "",
            )
    out.print(table)
    n_seg = len(fits.conversion.segments)
    out.print(f"{n_seg} segments ({fits.segment}) with their own fit; wrote {output}/")


@app.command()
def netcvr(config: ConfigOpt = Path("conf/netcvr.yaml"), overrides: SetOpt = None) -> None:
    """Replay an ETL'd event stream day by day and train the cascade NetCVR model (CVR head on
    clicks, refund head on purchases) in a delayed-feedback mode (naive, fnw, esdfm, wait,
    oracle); each day is tested on the next day's clicks. Recorded as an MLflow run.

    Example: `recfb netcvr --set data=data/etl --set mode=fnw --set first_test_day=10`
    """
    from recfb.config import load_config
    from recfb.delayed.replay import ReplayConfig, replay_tracked

    try:
        cfg = load_config(ReplayConfig, config, overrides)
        with out.status(f"replaying {cfg.test_days} days in mode {cfg.mode} ..."):
            run_id, result = replay_tracked(cfg)
    except RecfbError as exc:
        _fail(exc)
        return
    table = Table(title=f"{cfg.mode} ({'direct' if cfg.direct else 'cascade'}): run {run_id}")
    for col in ("target", "AUC", "PR-AUC", "NLL", "pred/obs", "n"):
        table.add_column(col)
    for target, m in result.pooled.items():
        table.add_row(
            target,
            f"{m['auc']:.4f}",
            f"{m['pr_auc']:.4f}",
            f"{m['nll']:.4f}",
            f"{m['pred_over_obs']:.3f}",
            f"{m['n']:,}",
        )
    out.print(table)


@app.command()
def loop(
    policies: Annotated[
        str | None,
        typer.Option(help="Comma-separated policy names of the config; default all of them."),
    ] = None,
    days: Annotated[
        int | None, typer.Option(help="Simulated days served (default: config).")
    ] = None,
    seeds: Annotated[
        str | None, typer.Option(help="Comma-separated seeds (default: the config's).")
    ] = None,
    out_dir: Annotated[Path, typer.Option("--out", help="Report and work directory.")] = Path(
        "data/loop"
    ),
    http: Annotated[
        bool, typer.Option(help="Ask a real HTTP server instead of the routes in process.")
    ] = False,
    track: Annotated[bool, typer.Option(help="One MLflow run per policy.")] = True,
    config: ConfigOpt = Path("conf/loop.yaml"),
    overrides: SetOpt = None,
) -> None:
    """Closed-loop evaluation: each policy serves simulated users for D days, their feedback
    flows back through the event log and the nightly retrain; net purchases, refunds, list
    quality and exposure concentration per day go to `OUT/report.md` (with curves) and MLflow.

    Example: `recfb loop --policies random,mf,two_stage --days 14 --seeds 1,2,3`
    """
    from recfb.loop.config import load_loop_config
    from recfb.loop.report import daily_table, policy_table, run_policies

    try:
        extra = [f"days={days}"] if days is not None else []
        cfg = load_loop_config(config, [*(overrides or []), *extra])
        names = [p.strip() for p in policies.split(",") if p.strip()] if policies else None
        names = names or list(cfg.policies)
        unknown = [n for n in names if n not in cfg.policies]
        if unknown:
            raise RecfbError(f"unknown policies {unknown}; {config} has {list(cfg.policies)}")
        seed_list = [int(x) for x in seeds.split(",")] if seeds else cfg.seeds
        with out.status("closed loop ...") as status:
            results, report = run_policies(
                cfg, names, seed_list, out_dir, http=http, track=track, progress=status.update
            )
    except (RecfbError, ValueError) as exc:
        _fail(exc)
        return
    table = Table(title=f"closed loop: {cfg.days} days, seeds {seed_list}")
    for col in ("policy", "net purchases/1k", "refunds/1k", "NDCG", "Gini", "coverage"):
        table.add_column(col)
    rows = policy_table(daily_table(results))
    for row in rows.iter_rows(named=True):
        table.add_row(
            row["policy"],
            f"{row['net_purchases_per_1k']:.2f}",
            f"{row['refunds_per_1k']:.2f}",
            f"{row['true_ndcg']:.3f}",
            f"{row['gini']:.3f}",
            f"{row['coverage']:.3f}",
        )
    out.print(table)
    for r in results:
        if r.skipped:
            out.print(f"[yellow]skipped[/] {r.policy}: {r.skipped}")
    out.print(f"report: {report}")


@app.command()
def serve(
    bundle: Annotated[
        str | None,
        typer.Option(
            help="Bundle directory or MLflow model URI (models:/recfb@production: fetched from "
            "the tracking server into a verified cache); default the registry's production "
            "version, else the newest bundle in models/ that passed the gate."
        ),
    ] = None,
    config: ConfigOpt = Path("conf/serve.yaml"),
    overrides: SetOpt = None,
) -> None:
    """Serve recommendations over HTTP (FastAPI on uvicorn) from a model bundle, logging
    posted events durably. Writes need the X-API-Key header: set RECFB_API_KEY.

    Example: `RECFB_API_KEY=secret recfb serve --bundle models:/recfb@production`
    """
    import os

    from recfb.config import load_config
    from recfb.serving import ServeConfig
    from recfb.serving import serve as run_server

    try:
        extra = [f"bundle={bundle}"] if bundle else []
        cfg = load_config(ServeConfig, config, [*(overrides or []), *extra])
        key = os.environ.get("RECFB_API_KEY") or cfg.api_key
        if not key:
            Console(stderr=True).print(
                "[yellow]warning:[/] no RECFB_API_KEY: POST /v1/events and admin calls are "
                "refused (403)"
            )
        run_server(cfg, key)
    except RecfbError as exc:
        _fail(exc)


pipeline_app = typer.Typer(help="Scheduled offline pipelines (pipelines/*.yaml).")
app.add_typer(pipeline_app, name="pipeline")


@pipeline_app.command("run")
def pipeline_run(
    definition: Annotated[Path, typer.Argument(help="A pipeline definition, pipelines/*.yaml.")],
    overrides: SetOpt = None,
    engine: EngineOpt = None,
    address: AddressOpt = None,
) -> None:
    """Run a pipeline's stages (etl -> train -> evaluate -> index -> register -> promote):
    unchanged stages are skipped, a failed run resumes at the failed stage, one run per
    pipeline at a time. Exit codes: 0 done, 1 a stage failed, 2 bad definition or input,
    75 already running.

    Example: `recfb pipeline run pipelines/nightly.yaml --set gate.tolerance=0.01`; with
    `--engine ray --address ADDR` its ETL, training and gate run on a Ray cluster.
    """
    import logging

    from recfb.pipeline.definition import load_pipeline
    from recfb.pipeline.runner import (
        EXIT_BUSY,
        EXIT_FAILED,
        PipelineBusy,
        StageFailed,
        run_pipeline,
    )

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    try:
        spec = load_pipeline(definition, overrides)
        for name in ("etl", "train"):  # the stages that run on either engine
            if name in spec.stages and (engine or address):
                stage = spec.stages[name]
                stage.set = [*stage.set, *_engine_sets(engine, address)]
        if engine:  # and the gate's scoring of the holdout users
            spec.gate.engine = engine  # type: ignore[assignment]
        if address:
            spec.gate.ray.address = address
        result = run_pipeline(spec, definition.read_text())
    except PipelineBusy as exc:
        out.print(f"[yellow]{exc}[/]")
        raise typer.Exit(EXIT_BUSY) from None
    except StageFailed as exc:
        out.print(f"[red]{exc}[/]")
        raise typer.Exit(EXIT_FAILED) from None
    except RecfbError as exc:
        _fail(exc)
        return
    print_pipeline(result)


def print_pipeline(result: Any) -> None:
    table = Table(title=f"pipeline {result.name}: MLflow run {result.parent_run_id}")
    for col in ("stage", "status", "seconds", "outputs"):
        table.add_column(col)
    for name, rec in result.stages.items():
        shown = {k: v for k, v in rec.outputs.items() if not isinstance(v, dict)}
        table.add_row(name, rec.status, f"{rec.seconds:.1f}", json.dumps(shown, default=str)[:80])
    out.print(table)
    out.print(f"report: {result.report}")


# top-level modules of the optional extras -> the extra that installs them
_EXTRA_OF = {
    "torch": "train",
    "torch_geometric": "train",
    "lightning": "train",
    "mlflow": "train",
    "matplotlib": "train",
    "threadpoolctl": "train",
    "fastapi": "serve",
    "uvicorn": "serve",
    "prometheus_client": "serve",
    "lleaves": "serve",
    "faiss": "cpu",
    "psycopg": "postgres",
    "psycopg_pool": "postgres",
    "ray": "ray",
}


def missing_extra_message(exc: ModuleNotFoundError) -> str | None:
    """Why a command failed in an install without its extra, and the pip line that fixes it."""
    top = (exc.name or "").split(".")[0]
    extra = _EXTRA_OF.get(top)
    if extra is None:
        return None
    return (
        f"this command needs the '{extra}' extra (module {top!r} is not installed): "
        f"pip install 'recfb[{extra}]'"
    )


def main() -> None:  # pragma: no cover - console entry point
    try:
        sys.exit(app())
    except ModuleNotFoundError as exc:
        message = missing_extra_message(exc)
        if message is None:
            raise
        _print_error(message)
        sys.exit(2)


if __name__ == "__main__":  # `python -m recfb.cli` (used by the tests' subprocess server)
    main()
