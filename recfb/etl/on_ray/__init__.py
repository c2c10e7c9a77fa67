"""`recfb etl` on a Ray cluster (`engine: ray`): shards of users run the local engine's own
phases (`clean_events`, `fold_events` of recfb/etl/pipeline.py), and the parts that need the
whole data are explicit reductions between them. The output directory holds the same
tables, with the same rows in the same order, as the local engine's; the pair tables and
the event log are partitioned parquet (a directory per table, one part per range of users,
in order), so no step rewrites them whole on the driver.

    schemas      [Ray]    per input: its columns; the driver combines them as the local
                          engine's one query over every file does (union, relaxed types)
    read         [Ray]    per input (or slice of a large parquet file): read + validate
                          (the local code: quarantine, provenance, the slow path for a
                          malformed file), in the combined types; its good
                          rows written into user shards (hash(user_id) mod S) with their place
                          in the input, its event_ids into buckets (hash(event_id) mod S)
    same event_id [Ray]   per bucket: every copy of an id is in one bucket, in input order;
                          the first copy wins (the local rule), the others' places go to their
                          user shards
    clean        [Ray]    per shard: its parts in input order, less those places; the
                          (user, item, event, ts) rule, noise by dwell
    filters               reduction (when configured): the outlier rate from every user's
             [Ray]        rate; the k-core in rounds: per shard, peel its engaged pairs
                          (outliers, items found under their minimum, then its users under
                          theirs), then add the items' degrees over shards; per shard, the
                          decision applied
    vocabularies          reduction: each id's first event time, min over shards, then the
                          local `extend_vocab` (indices by first appearance, then id)
    cut points            reduction: the temporal windows' quantiles, exact, from every
                          shard's events counted by hour, then the times of the one hour
                          a quantile falls in (fetched from the shards), or the end of data
    ranges       [Ray]    per shard: its events split by their user's range of consecutive
                          user indices (about equal events each; the driver picks them)
    fold         [Ray]    per range: index, link, order as the log, split, fold; its part
                          of each pair table and of the event log written, final
    place                 driver: each range's parts moved into the tables' directories
                          (each range sorted as the local output, the ranges in index
                          order: their parts in order are its table, no merge); the
                          statistics from added counts and summaries

With filters, the clean phase returns each user's event rate and writes its engaged pairs;
the driver decides the outlier rate, and the k-core is peeled on the shards with only the
items' degrees coming back (users are whole in their shard: their degrees are local). The
driver holds what the reductions need (quarantined rows, each id's first time, hourly
counts, user rates, item degrees); the events themselves pass through workers only. A
parquet file over `ray.rows_per_read` rows is read by several tasks; a CSV or JSONL file is
one task.
"""

from recfb.etl.on_ray.driver import run_etl_ray

__all__ = ["run_etl_ray"]
