"""Two-stage recommendation: candidates from several sources, features from every signal,
a learned LambdaRank ranker; the same candidates and features offline and in the service."""

from recfb.rank.config import FEATURE_GROUPS, SOURCES, RankConfig
from recfb.rank.ranker import Ranker
from recfb.rank.state import Snapshot, snapshot_from_etl

__all__ = ["FEATURE_GROUPS", "SOURCES", "RankConfig", "Ranker", "Snapshot", "snapshot_from_etl"]
