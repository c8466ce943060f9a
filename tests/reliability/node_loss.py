"""A driver for the node-loss cases, run as `python -m tests.reliability.node_loss STAGE ...`
in a process of its own: it starts a real multi-node Ray cluster on this machine
(`ray.cluster_utils.Cluster`: a head node without CPUs for tasks, two worker nodes), runs the
stage against the loopback S3 server, removes one worker node (its raylet, object store and
workers) once the first unit is done, and prints one JSON line with what happened.

    refine INGEST_URI OUTPUT_URI  (then `jobs.refine` with a local --output on the cluster)
    pseudo_masks REFINE_URI OUTPUT_URI CHECKPOINT
    train REFINE_URI OUTPUT_URI   (worker nodes of 2 CPUs, one Ray Train worker each; the node
                                   is removed after the first checkpoint and a new one added
                                   `RESOURCES_BACK_S` later; once it has committed, that node
                                   is removed for good and the run asked for 4 more
                                   iterations with --resume: it must fail after
                                   `GONE_WAIT_S`, its checkpoint kept)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any

import ray
from ray.cluster_utils import Cluster

from pipelines.io.manifest import read_manifest
from pipelines.io.storage import resolve
from pipelines.training.run import latest_checkpoint_iteration

RESOURCES_BACK_S = 5.0
GONE_WAIT_S = 6.0  # the second run's --resource-wait-s


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


def _remove_after_a_checkpoint(
    cluster: Cluster,
    node: Any,
    output_uri: str,
    facts: dict[str, Any],
    started: float,
) -> Any:
    out = resolve(output_uri)
    # once Ray Train has registered a checkpoint (its files are all uploaded by then)
    while latest_checkpoint_iteration(out) is None:
        time.sleep(0.2)
    pattern = out.join("checkpoints", "run") + "/checkpoint_*/meta.json"
    facts["checkpoints_at_removal"] = len(out.fs.glob(pattern))
    facts["checkpoint_at_removal"] = latest_checkpoint_iteration(out)
    facts["removed_at_s"] = round(time.monotonic() - started, 2)
    cluster.remove_node(node, allow_graceful=False)
    facts["removed"] = True
    time.sleep(RESOURCES_BACK_S)
    added = cluster.add_node(num_cpus=2)  # Ray starts a node from the main thread only
    facts["node_added_at_s"] = round(time.monotonic() - started, 2)
    return added


def _lose_a_node_for_good(cluster: Cluster, node: Any, source: str, output: str) -> dict[str, Any]:
    """Removes `node` for good, then asks the finished run for 4 more iterations (--resume),
    which one node cannot hold: what the run raised, and how long it took."""
    cluster.remove_node(node, allow_graceful=False)
    while sum(1 for n in ray.nodes() if n["Alive"]) > 2:  # the head and one worker node
        time.sleep(0.2)
    started = time.monotonic()
    try:
        _train(source, output, iterations=12, resume=True, resource_wait_s=GONE_WAIT_S)
        error = None
    except Exception as e:  # noqa: BLE001 - what the user would see, reported
        error = f"{type(e).__name__}: {e}"
    return {"error": error, "seconds": round(time.monotonic() - started, 2)}


def _train(source: str, output: str, iterations: int = 8, **options: Any) -> Any:
    from pipelines.train import TrainJobConfig, run_train
    from weakclip.config import from_dict, preset

    fast = {"clip": {"input_size": 128}, "loss": {"resolution": 32}}
    model = from_dict(
        {**fast, "train": {"iterations": iterations, "batch_size": 4, "lr": 1e-3}},
        base=preset("tiny"),
    )
    config = TrainJobConfig(
        input=source, output=output, model=model, num_workers=2, cpus_per_worker=1.5,
        checkpoint_every=4, log_every=2, max_failures=2, **options,
    )  # fmt: skip
    return run_train(config, log=lambda _: None)


def main(argv: list[str]) -> int:
    stage, source, output = argv[:3]
    # A node is declared dead after 3 missed 1 s health checks (Ray's default: 5 of 3 s).
    health = {"health_check_period_ms": 1000, "health_check_failure_threshold": 3}
    cluster = Cluster(
        initialize_head=True, head_node_args={"num_cpus": 0, "_system_config": health}
    )
    workers = [cluster.add_node(num_cpus=2 if stage == "train" else 1) for _ in range(2)]
    ray.init(address=cluster.address, log_to_driver=False)
    cluster.wait_for_nodes()
    facts: dict[str, Any] = {"nodes": len(ray.nodes()), "removed": False}
    started = time.monotonic()
    quiet = dict(report=lambda _: None)
    if stage == "train":  # training on a thread: the main thread removes and adds the nodes
        done: list[Any] = []
        trainer = threading.Thread(target=lambda: done.append(_train(source, output)))
        trainer.start()
        added = _remove_after_a_checkpoint(cluster, workers[0], output, facts, started)
        trainer.join()
        if not done:
            raise RuntimeError("training raised (its traceback is above)")
        result = done[0]
        facts.update(iterations=result.iterations, ok=True)
        manifest = read_manifest(resolve(output))  # the extension below removes it
        facts["manifest_iterations"] = manifest.extra["iterations"]
        facts["seconds"] = round(time.monotonic() - started, 2)
        facts["gone"] = _lose_a_node_for_good(cluster, added, source, output)
    else:
        threading.Thread(
            target=_remove_when_a_unit_is_done,
            args=(cluster, workers[0], output, facts, started),
            daemon=True,
        ).start()
    if stage == "refine":
        from pipelines.refine import RefineConfig, run_refine

        config = RefineConfig(rows_per_unit=1)  # a unit per row: many units to lose one of
        result = run_refine(source, output, config, num_cpus_per_task=0.5, **quiet)
    elif stage == "pseudo_masks":
        from pipelines.pseudo_masks import PseudoMaskConfig, run_pseudo_masks

        masks = PseudoMaskConfig(scales=(1.0,), flip=False, report_images=0)
        result = run_pseudo_masks(
            source, output, argv[3], masks, actor_pool_size=2, cpus_per_actor=0.5,
            num_cpus_per_task=0.25, **quiet,
        )  # fmt: skip
    if stage != "train":
        facts.update(ok=result.ok, seconds=round(time.monotonic() - started, 2))
    facts["recovery_s"] = round(facts["seconds"] - facts["removed_at_s"], 2)
    facts["alive_nodes_at_end"] = sum(1 for n in ray.nodes() if n["Alive"])
    if stage == "refine":  # the same job with a local --output, on this multi-node cluster
        local = tempfile.mkdtemp(prefix="weakclip-local-output-")
        job = [sys.executable, "-m", "jobs.refine", "--input", source, "--output", local]
        done = subprocess.run(
            [*job, "--ray-address", cluster.address], capture_output=True, text=True, timeout=120
        )
        errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
        facts["local_output"] = {"rc": done.returncode, "error": errors[-1] if errors else ""}
        facts["local_output"]["untouched"] = not os.listdir(local)
    print(json.dumps(facts))
    ray.shutdown()
    cluster.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
