"""Policy: pure functions that take data and `now` and return decisions.

No I/O, no clock reads, no logging: the callers carry the decisions out and log them.
"""
