"""schemathesis hooks for tests/test_serving_hostile.py: bodies where generated numbers become
NaN, +-Infinity or 1e400 and generated text becomes lone surrogates, control characters or
right-to-left overrides, sent as the non-standard JSON a careless or hostile client sends.

Loaded through SCHEMATHESIS_HOOKS; deterministic (a seeded generator), so a failure repeats."""

import json
import os
import random

import schemathesis

_RNG = random.Random(15)
_BIG = "1e400"  # no Python float prints as this: a marker replaced in the serialised text
NUMBERS = (float("nan"), float("inf"), float("-inf"), _BIG)
TEXTS = ("\ud800", "\udfff x", "a\u202eb", "\x00", "\x1b[31m", " ", "\u2066id\u2069")


def _twist(value):
    if isinstance(value, dict):
        return {k: _twist(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_twist(v) for v in value]
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, int | float) and _RNG.random() < 0.5:
        return _RNG.choice(NUMBERS)
    if isinstance(value, str) and _RNG.random() < 0.5:
        return _RNG.choice(TEXTS)
    return value


@schemathesis.hook
def map_body(context, body):
    return _twist(body)


@schemathesis.serializer("application/json")
def hostile_json(ctx, value):
    """JSON with NaN/Infinity tokens, lone surrogates as \\u escapes and 1e400 literals."""
    if isinstance(value, bytes):
        return value  # raw bytes generated for a negative case: sent as they are
    text = json.dumps(value, allow_nan=True, ensure_ascii=True, default=str)
    text = text.replace(f'"{_BIG}"', _BIG)
    trace = os.environ.get("HOSTILE_HOOKS_TRACE")
    if trace:  # the test checks that hostile bodies were sent at all
        with open(trace, "a") as f:
            f.write(text[:2000].replace("\n", " ") + "\n")
    return text.encode()
