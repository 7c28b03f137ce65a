"""The cluster resource request of a Ray Train run, released when the driver exits early.

Ray Train V2's controller asks the cluster's AutoscalingCoordinator (a detached actor, named
``AutoscalingCoordinator`` in the namespace of that name) for its workers' resources, under the
requester id ``train-<the run's id>``, and cancels the request when the controller finishes or is
aborted. A driver that exits while the controller still runs (after a worker's preemption the
driver exits 75 at once; its job's actors, the controller among them, are killed) leaves the
request live until it expires, 180 s later; a rerun on the same cluster with ``workers=MIN-MAX``
is then told that 0 workers' resources are ready and waits out those 180 s (measured by the chaos
run, benchmarks/chaos.py). So rank 0 reports its run's id in the ``start`` event and the driver
cancels the request itself before such an exit.

Both ends use Ray internals (the train run's id is not in the public TrainContext): on a Ray where
they are missing, nothing is released and the request expires as before.
"""

from __future__ import annotations

import logging

import ray

log = logging.getLogger(__name__)

COORDINATOR = ("AutoscalingCoordinator", "AutoscalingCoordinator")   # (name, namespace)


def train_run_id() -> str | None:
    """Inside a Ray Train worker: the id of the train run (the controller's requester id is
    ``train-<id>``); None where this Ray does not say."""
    try:
        from ray.train.v2._internal.execution.context import get_train_context
        return str(get_train_context().train_run_context.run_id)
    except Exception:  # noqa: BLE001 - another Ray: nothing to release later
        return None


def release(train_run: str | None, timeout: float = 5.0) -> bool:
    """On the driver: cancel the train run's resource request, if it has one. True when the
    coordinator took the cancel (it ignores a requester it does not know)."""
    if not train_run:
        return False
    try:
        coordinator = ray.get_actor(COORDINATOR[0], namespace=COORDINATOR[1])
        ray.get(coordinator.cancel_request.remote(requester_id=f"train-{train_run}"), timeout=timeout)
        return True
    except Exception as e:  # noqa: BLE001 - best effort: the request expires by itself
        log.debug("could not release the resource request of train run %s: %s", train_run, e)
        return False
