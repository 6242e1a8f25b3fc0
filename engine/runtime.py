"""Start or join Ray: an embedded local Ray by default, a cluster when an address is given.

`ray job submit` sets RAY_ADDRESS for the job, so the same script joins the cluster unchanged.
A local Ray is kept on loopback (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 makes Ray bind 127.0.0.1 on Linux).
"""

from __future__ import annotations

import logging
import os

from engine.config import RayConfig
from engine.errors import RetryableError

log = logging.getLogger("rexverse.runtime")


def cluster_address(cfg: RayConfig) -> str | None:
    return cfg.address or os.environ.get("RAY_ADDRESS") or None


def quiet_without_dashboard() -> None:
    """Worker setup for a local Ray started without its dashboard (it costs ~0.9 GB here): Ray Train's
    placement-group cleaner asks the dashboard's State API whether the run's controller lives, every second,
    and logs a warning each time it cannot reach it. Only that logger is raised to errors."""
    logging.getLogger("ray.train.v2._internal.execution.controller.placement_group_cleaner").setLevel(
        logging.ERROR
    )


def init_ray(cfg: RayConfig, namespace: str, train: bool = False) -> bool:
    """Initialise Ray; returns True when this call started a local Ray (the caller shuts it down).

    `train`: the job runs Ray Train (its local workers get `quiet_without_dashboard`). Only then: a job
    with a runtime env cannot use the workers Ray starts ahead of time, so every actor would wait for a
    fresh process (~2.4 s more for a short pool run here, and those idle workers' CPU).
    """
    import ray
    from ray.data import DataContext

    address = cluster_address(cfg)
    started_local = False
    if ray.is_initialized():
        pass
    elif address:
        ray.init(address=address, namespace=namespace, log_to_driver=True)
        log.info("joined Ray cluster at %s", address)
    else:
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
        ray.init(
            num_cpus=cfg.num_cpus,
            object_store_memory=cfg.object_store_memory,
            namespace=namespace,
            include_dashboard=False,
            log_to_driver=True,
            runtime_env={"worker_process_setup_hook": "engine.runtime.quiet_without_dashboard"}
            if train
            else None,
        )
        started_local = True
        log.info("started a local Ray with %s CPUs", ray.cluster_resources().get("CPU"))
    context = DataContext.get_current()
    context.max_errored_blocks = cfg.max_errored_blocks
    # A failing object store is retried (Ray Data retries actor tasks), never turned into rejects
    context.actor_task_retry_on_errors = [RetryableError]
    # A stage's own exception reaches the driver as itself (Ray Data would wrap it in a UserCodeException
    # that keeps only its text): the run recognises `StageFailing` and stops with one clear message
    context.raise_original_map_exception = True
    context.enable_progress_bars = cfg.show_progress
    context.print_on_execution_start = cfg.show_progress
    return started_local
