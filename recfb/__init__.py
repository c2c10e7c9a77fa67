"""recfb: a recommender engine for ordered, noisy, delayed multi-signal implicit feedback.

    import recfb
    data = recfb.etl.run(events, "conf/signals/simulator.yaml")   # in memory
    model = recfb.Recommender.create("two_stage").fit(data)
    model.recommend(["u1"], k=10)

Imports stay light: torch and Lightning load only when a model is fitted.
"""

from importlib.metadata import PackageNotFoundError, version

from recfb import etl
from recfb.etl import Interactions
from recfb.recommender import Recommender

try:
    __version__ = version("recfb")
except PackageNotFoundError:  # a source tree that is not installed
    __version__ = "0+unknown"

__all__ = ["Interactions", "Recommender", "__version__", "etl"]
