"""Errors that are not the input's fault: the batch is retried (by Ray, or by rerunning), never rejected."""

from __future__ import annotations


class RetryableError(Exception):
    """A failure of the environment (a dropped connection, a throttled object store), not of the item.

    Stages let it propagate instead of turning it into per-item rejects: a reject is committed and a resume
    skips it, so a good image would be lost to a network blip. Under Ray the task is retried
    (`DataContext.actor_task_retry_on_errors`); after the retries, or in-process, the run stops with its
    committed parts kept, and rerunning the command processes what is left.
    """
