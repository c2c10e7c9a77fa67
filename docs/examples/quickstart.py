"""recfb from Python, notebook style: simulate a shop, ETL in memory, fit the two-stage
recommender, recommend, save, and load in a fresh process to the same lists.

Run it as a script (`python docs/examples/quickstart.py [WORKDIR]`); each `# %%` block is a
notebook cell. The test suite runs it (tests/test_docs.py), so it cannot rot.
"""

# %% a small shop from recfb's simulator (your own log: any frame with these columns)
import subprocess
import sys
import tempfile
from pathlib import Path

import polars as pl

import recfb
from recfb.simulate import SimConfig, simulate

work = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tempfile.mkdtemp(prefix="recfb-"))
simulate(SimConfig(seed=7, n_users=800, n_items=300, n_events=80_000), work / "sim")
events = pl.read_parquet(work / "sim" / "events")  # user_id, item_id, event, ts, value, ...
print(events.head(3))

# %% what each raw event means: ordered levels, cancellations, dwell noise, negatives
signal_map = {
    "name": "shop",
    "levels": [{"name": "view"}, {"name": "click"}, {"name": "engage"}, {"name": "purchase"}],
    "signals": {
        "view": {"level": "view"},
        "click": {"level": "click", "min_dwell_s": 3.0},  # shorter clicks are noise
        "like": {"level": "engage"},
        "cart": {"level": "engage"},
        "purchase": {"level": "purchase"},
        "dislike": {"negative": True},
        "undislike": {"cancels": "dislike"},
        "unlike": {"cancels": "like"},
        "refund": {"cancels": "purchase", "fallback": "negative"},
    },
    "attribution": {"clock_signals": ["click"]},
}

# %% ETL in memory: validated, de-duplicated, folded into ordinal pairs, split in time
data = recfb.etl.run(events, signal_map)
print(data)  # nothing was written to disk

# %% the two-stage recommender: MF candidates + history + cascade walk + trending, LambdaRank
model = recfb.Recommender.create(
    "two_stage", embedding={"model": {"family": "mf", "dim": 32}, "trainer": {"max_epochs": 5}}
)
model.fit(data)
print({k: round(v, 4) for k, v in model.metrics.items() if k.endswith("ndcg@10")})

# %% recommendations by external id (an unknown id gets the popular items)
users = data.users["user_id"].cast(pl.String).head(5).to_list() + ["a-new-visitor"]
recs = model.recommend(users, k=10)
print(recs.head(12))
print(model.similar_items([recs["item_id"][0]], k=5))

# %% save, then load in a fresh Python process: the same lists
model.save(work / "model")
load_and_recommend = (
    "import sys, recfb; "
    "m = recfb.Recommender.load(sys.argv[1]); "
    "m.recommend(sys.argv[3].split(','), k=10).write_parquet(sys.argv[2])"
)
subprocess.run(
    [
        sys.executable,
        "-c",
        load_and_recommend,
        str(work / "model"),
        str(work / "again.parquet"),
        ",".join(users),
    ],
    check=True,
)
again = pl.read_parquet(work / "again.parquet")
assert again.equals(recs), "the loaded model gives other lists"
print("same lists after save -> load in a fresh process")
