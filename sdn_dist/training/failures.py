"""Bad input inside a worker ends the run at once, with exit status 2.

Ray Train restarts the worker group after *any* worker error, up to ``ray.max_failures`` times
(its default failure policy retries every ``WorkerGroupError``, with no public way to mark one
final). That is right for a killed process or a lost node, and wrong for a full disk, an
unwritable ``out`` or a hostile checkpoint: each retry would resume, fail the same way and burn
time. So a worker that raises :class:`~sdn_dist.errors.UserError` first reports it to the
record collector; the driver, which drains it twice a second, raises it and exits 2 while
Ray Train is still tearing the group down (the embedded Ray, or the job's actors, go with it).
"""

from __future__ import annotations

import functools
import time

import ray

from sdn_dist.errors import UserError

EVENT = "user_error"


def stop_on_user_error(train_fn):
    """Wrap a Ray Train worker function: a UserError is reported to ``config["collector"]``
    (as a record the driver recognises), then re-raised."""

    @functools.wraps(train_fn)
    def run(config: dict):
        try:
            return train_fn(config)
        except UserError as e:
            # rank=None: no rank's training progress.
            ray.get(config["collector"].report.remote(
                [{"event": EVENT, "rank": None, "message": str(e), "time": time.time()}]))
            raise

    return run


def reported_user_error(records: list[dict]) -> UserError | None:
    """The first user error a worker reported (``stop_on_user_error``) among the drained records,
    if any. (``driver.unwrap_user_error`` finds one inside the exception Ray Train raised.)"""
    for r in records:
        if r.get("event") == EVENT:
            return UserError(r["message"])
    return None
