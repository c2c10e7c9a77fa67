"""Delayed feedback: delay models of the click -> purchase -> refund cascade and rates corrected
for outcomes that have not arrived yet."""
