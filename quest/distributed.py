"""Collectives that cannot hang a job: a bounded wait everywhere, a long one only for k-means.

The process group's timeout (`run.timeout_minutes`) bounds every collective, so a stuck or dead rank
ends the job in minutes with a message naming the stage the others were waiting in. The one phase
where ranks legitimately wait long, k-means on rank 0, waits on a separate gloo group with its own
limit (`wait_for_main`).
"""

from __future__ import annotations

import re
from contextlib import contextmanager
from datetime import timedelta

import torch.distributed as dist

from .errors import QuestError

# Rank 0 clusters up to millions of vectors on the CPU while the other ranks wait.
KMEANS_WAIT = timedelta(hours=3)

_long_group = None
_stage = "start-up"


class CollectiveTimeout(QuestError, RuntimeError):
    """Another rank did not reach a collective in time."""


def init(num_processes: int) -> None:
    """Create the long-wait group (collective: every rank calls it, once, in the same order)."""
    global _long_group
    if num_processes > 1 and dist.is_initialized() and _long_group is None:
        _long_group = dist.new_group(backend="gloo", timeout=KMEANS_WAIT)


def wait_for_main() -> None:
    """Block until rank 0 reaches the same call, with the long limit (k-means)."""
    if _long_group is not None:
        dist.barrier(group=_long_group)


def stage(name: str) -> None:
    """Name what this rank does now; a collective timeout reports it."""
    global _stage
    _stage = name


def is_timeout(err: BaseException) -> bool:
    return isinstance(err, RuntimeError) and bool(re.search(r"timed out|timeout", str(err), re.I))


@contextmanager
def bounded(timeout_minutes: float, rank: int):
    """Turn a collective's timeout into one line naming the stage this rank was in."""
    try:
        yield
    except RuntimeError as err:
        if not is_timeout(err) or isinstance(err, CollectiveTimeout):
            raise
        raise CollectiveTimeout(
            f"rank {rank} waited more than run.timeout_minutes = {timeout_minutes:g} for the other "
            f"ranks during {_stage}: a rank is stuck or dead (see its log); the newest complete "
            "checkpoint in run.dir/checkpoints is where a restart resumes"
        ) from None
