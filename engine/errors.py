"""Errors that are not the input's fault: the batch is retried (by Ray, or by rerunning), never rejected."""

from __future__ import annotations


class RetryableError(Exception):
    """A failure of the environment (a dropped connection, a throttled object store), not of the item.

    Stages let it propagate instead of turning it into per-item rejects: a reject is committed and a resume
    skips it, so a good image would be lost to a network blip. Under Ray the task is retried
    (`DataContext.actor_task_retry_on_errors`); after the retries, or in-process, the run stops with its
    committed parts kept, and rerunning the command processes what is left.
    """


class StageFailing(RuntimeError):
    """A stage failed on so many items in a row (or such a share of its first items) that the stage, not
    the data, is at fault: the run stops (exit != 0) instead of rejecting every image. Committed parts
    stay; the images it rejected with `stage error` are processed again by a rerun."""

    def __init__(self, stage: str, errors: int, summary: str, first_error: str) -> None:
        self.stage, self.errors, self.summary, self.first_error = stage, errors, summary, first_error
        super().__init__(
            f"stage {stage!r} failed on {summary}; first error: {first_error}. "
            "The stage looks broken, not the data, so the run stopped"
        )

    def __reduce__(self) -> tuple:  # picklable across Ray processes with its fields
        return (type(self), (self.stage, self.errors, self.summary, self.first_error))


def find_cause(exc: BaseException, kind: type[BaseException]) -> BaseException | None:
    """`exc` or the first exception of type `kind` in its cause/context chain (Ray wraps an actor's
    exception in a RayTaskError that keeps the original as `.cause`)."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, kind):
            return current
        seen.add(id(current))
        wrapped = getattr(current, "cause", None)  # Ray's RayTaskError keeps the task's exception here
        current = wrapped if isinstance(wrapped, BaseException) else current.__cause__ or current.__context__
    return None
