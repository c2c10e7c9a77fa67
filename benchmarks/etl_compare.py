"""Check that two checkouts of recfb write the same ETL outputs (a guard for ETL speed work).

Runs `run_etl` from each checkout (in its own process, PYTHONPATH=<checkout>) on the same
inputs, then compares every output file: parquet tables row for row after sorting by all
columns (and says whether the row order is the same too), stats.json less the timings.
Inputs: simulated events (--sim, a directory of parquet files) and/or the Taobao sample
(conf/datasets/taobao.yaml with its input pointed at --taobao).

    python benchmarks/etl_compare.py --base /work/wt-base --new . \
        --sim /tmp/recfb-bench/sim-1000000/events \
        --taobao ../shared/data/taobao_userbehavior_84k.csv --work /tmp/etl-compare
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import polars as pl
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import run_in_checkout  # noqa: E402

_CHILD = """
import json, sys
from recfb.config import build_model
from recfb.etl import EtlConfig, run_etl
run_etl(build_model(EtlConfig, json.loads(sys.argv[1]), "compare"), quiet=True)
"""


def run(checkout: Path, config: dict, out: Path) -> None:
    run_in_checkout(checkout, _CHILD, [json.dumps(config | {"out": str(out)}, default=str)])


def compare_dirs(a: Path, b: Path) -> list[str]:
    """Differences between two ETL output directories (empty: identical)."""
    problems = []
    names_a = sorted(p.name for p in a.iterdir())
    names_b = sorted(p.name for p in b.iterdir())
    if names_a != names_b:
        problems.append(f"files differ: {names_a} vs {names_b}")
    for name in sorted(set(names_a) & set(names_b)):
        if name == "stats.json":
            sa, sb = (json.loads((d / name).read_text()) for d in (a, b))
            sa.pop("timings_s", None)
            sb.pop("timings_s", None)
            if sa != sb:
                keys = sorted(k for k in set(sa) | set(sb) if sa.get(k) != sb.get(k))
                problems.append(f"stats.json differs in {keys}")
            continue
        fa, fb = pl.read_parquet(a / name), pl.read_parquet(b / name)
        if fa.schema != fb.schema:
            problems.append(f"{name}: schema {fa.schema} vs {fb.schema}")
            continue
        if fa.height != fb.height:
            problems.append(f"{name}: {fa.height} vs {fb.height} rows")
            continue
        if not fa.sort(fa.columns, nulls_last=True).equals(fb.sort(fb.columns, nulls_last=True)):
            problems.append(f"{name}: rows differ (sorted)")
        elif not fa.equals(fb):
            print(f"  note: {name} has the same rows in another order", file=sys.stderr)
    return problems


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", type=Path, required=True)
    parser.add_argument("--new", type=Path, default=ROOT)
    parser.add_argument("--sim", type=Path)
    parser.add_argument("--taobao", type=Path)
    parser.add_argument("--work", type=Path, default=Path("/tmp/etl-compare"))
    args = parser.parse_args()
    cases: dict[str, dict] = {}
    if args.sim:
        cases["sim"] = {
            "input": {"paths": [str(args.sim.resolve())], "format": "parquet"},
            "signals": str(ROOT / "conf/signals/simulator.yaml"),
        }
        for method, leave_out in (("leave_last_out", "positive"), ("leave_last_out", "deepest")):
            split = {"method": method, "leave_out": leave_out}
            cases[f"sim-{method}-{leave_out}"] = cases["sim"] | {"split": split}
    if args.taobao:
        cfg = yaml.safe_load((ROOT / "conf/datasets/taobao.yaml").read_text())
        cfg["input"]["paths"] = [str(args.taobao.resolve())]
        cfg["signals"] = str(ROOT / cfg["signals"])
        cfg.pop("out", None)
        cases["taobao"] = cfg
    failed = False
    for case, config in cases.items():
        outs = {}
        for side, checkout in (("base", args.base), ("new", args.new)):
            outs[side] = args.work / case / side
            run(checkout.resolve(), config, outs[side])
        problems = compare_dirs(outs["base"], outs["new"])
        print(f"{case}: {'identical' if not problems else 'DIFFERENT'}")
        for p in problems:
            print(f"  {p}")
        failed |= bool(problems)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
