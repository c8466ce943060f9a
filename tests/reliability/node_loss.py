"""A driver for the node-loss cases, run as `python -m tests.reliability.node_loss STAGE ...`
in a process of its own: it starts a real multi-node Ray cluster on this machine
(`ray.cluster_utils.Cluster`: a head node without CPUs for tasks, two worker nodes), runs the
stage against the loopback S3 server, removes one worker node (its raylet, object store and
workers) once the first unit is done, and prints one JSON line with what happened.

    refine INGEST_URI OUTPUT_URI
    pseudo_masks REFINE_URI OUTPUT_URI CHECKPOINT
"""

from __future__ import annotations

import json
import sys
import threading
import time
from typing import Any

import ray
from ray.cluster_utils import Cluster

from pipelines.io.storage import resolve


def _remove_when_a_unit_is_done(
    cluster: Cluster, node: Any, output_uri: str, facts: dict[str, Any], started: float
) -> None:
    out = resolve(output_uri)
    while not out.fs.glob(out.join("_units") + "/*.json"):
        time.sleep(0.05)
    facts["units_done_at_removal"] = len(out.fs.glob(out.join("_units") + "/*.json"))
    facts["removed_at_s"] = round(time.monotonic() - started, 2)
    cluster.remove_node(node, allow_graceful=False)
    facts["removed"] = True


def main(argv: list[str]) -> int:
    stage, source, output = argv[:3]
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    workers = [cluster.add_node(num_cpus=1) for _ in range(2)]
    ray.init(address=cluster.address, log_to_driver=False)
    cluster.wait_for_nodes()
    facts: dict[str, Any] = {"nodes": len(ray.nodes()), "removed": False}
    started = time.monotonic()
    killer = threading.Thread(
        target=_remove_when_a_unit_is_done,
        args=(cluster, workers[0], output, facts, started),
        daemon=True,
    )
    killer.start()
    quiet = dict(report=lambda _: None)
    if stage == "refine":
        from pipelines.refine import RefineConfig, run_refine

        result = run_refine(source, output, RefineConfig(), num_cpus_per_task=0.5, **quiet)
    else:
        from pipelines.pseudo_masks import PseudoMaskConfig, run_pseudo_masks

        masks = PseudoMaskConfig(scales=(1.0,), flip=False, report_images=0)
        result = run_pseudo_masks(
            source, output, argv[3], masks, actor_pool_size=2, cpus_per_actor=0.5,
            num_cpus_per_task=0.25, **quiet,
        )  # fmt: skip
    facts.update(ok=result.ok, seconds=round(time.monotonic() - started, 2))
    if facts.get("removed_at_s") is not None:
        facts["recovery_s"] = round(facts["seconds"] - facts["removed_at_s"], 2)
    facts["alive_nodes_at_end"] = sum(1 for n in ray.nodes() if n["Alive"])
    print(json.dumps(facts))
    ray.shutdown()
    cluster.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
