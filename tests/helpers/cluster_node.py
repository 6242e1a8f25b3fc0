"""A Ray cluster of a head and two worker nodes on loopback, run in its own process for a test.

Its own process, so that Ray's settings (token auth with the test's own token) are read from an environment
set before Ray is imported. Prints `address <gcs address>` once the nodes are up, then reads commands from
stdin: `kill-worker` removes the first worker node at once (not gracefully) and prints `killed`; end of
input shuts the cluster down.
"""

import sys

from ray.cluster_utils import Cluster


def main() -> None:
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    workers = [cluster.add_node(num_cpus=1) for _ in range(2)]
    cluster.wait_for_nodes()
    print(f"address {cluster.address}", flush=True)
    try:
        for line in sys.stdin:
            if line.strip() == "kill-worker":
                cluster.remove_node(workers[0], allow_graceful=False)
                print("killed", flush=True)
    finally:
        cluster.shutdown()


if __name__ == "__main__":
    main()
