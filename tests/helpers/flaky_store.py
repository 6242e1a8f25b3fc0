"""A Ray worker setup hook that makes this process's object-store reads fail a few times, then work.

Installed through `runtime_env={"worker_process_setup_hook": "tests.helpers.flaky_store.install"}`; each
simulated failure leaves a file in $FLAKY_STORE_LOG so the test can count them across processes.
"""

from __future__ import annotations

import os
import uuid

FAILURES_PER_PROCESS = int(os.environ.get("FLAKY_STORE_FAILURES", "4"))


def install() -> None:
    import engine.sources as sources

    real = sources.filesystem_for
    failures = {"left": FAILURES_PER_PROCESS}

    class Flaky:
        def __init__(self, fs) -> None:
            self.fs = fs

        def open_input_file(self, path: str):
            if failures["left"] > 0:
                failures["left"] -= 1
                open(os.path.join(os.environ["FLAKY_STORE_LOG"], uuid.uuid4().hex), "w").close()
                raise OSError("AWS Error NETWORK_CONNECTION during GetObject operation (simulated)")
            return self.fs.open_input_file(path)

    def flaky_filesystem_for(uri: str):
        fs, path = real(uri)
        return Flaky(fs), path

    sources.filesystem_for = flaky_filesystem_for
    sources.RETRY_BACKOFF_S = 0.05
