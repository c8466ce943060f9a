r"""Pseudo masks: a trained WeakCLIP (train's model.pt, or the authors' released .pth) run
over an ingest or refine output.

    python -m jobs.pseudo_masks --input s3://bucket/run/refine \
        --checkpoint s3://bucket/run/train/model.pt --output s3://bucket/run/pseudo_masks \
        [--scales 0.5,1,1.5] [--no-flip] [--no-restrict] [--no-crf] [--splits train|all] \
        [--actor-pool-size 2] [--config pseudo.yaml]

Multi-scale + flip sliding-window inference in a pool of up to `--actor-pool-size` model
replicas (one GPU each when the cluster has GPUs), restricted to background + each image's
classes, then dense-CRF post-processing on CPU tasks. A released checkpoint (hustvl/WeakCLIP's
`train_74p03_iter_8000.pth` and the like) is detected by its layout; its class names are its
`meta["CLASSES"]`, its architecture `--released-config FILE` (default the paper's vit-b-16).
`--config FILE` holds fields of
`pipelines.pseudo_masks.PseudoMaskConfig` (e.g. `bilateral_sxy`, `crf_iterations`); flags
override it. The checkpoint is loaded with `torch.load(weights_only=True)` before Ray starts;
anything else is refused. Exit status: 0 success; 1 failure with a one-line reason on stderr;
2 usage error.
"""

from __future__ import annotations

import argparse

from pipelines import cli as job
from pipelines.io.manifest import read_manifest
from pipelines.pseudo_masks import PseudoMaskConfig, run_pseudo_masks
from pipelines.pseudo_masks.checkpoint import verify_checkpoint
from pipelines.pseudo_masks.config import add_options, config_fields, released_model, run_options
from pipelines.pseudo_masks.stage import check_class_names

# One model replica on 1 CPU; CRF tasks on half a CPU: on 2 cores both stages run at once.
DEFAULT_RESOURCES = job.Resources(num_cpus_per_task=0.5, actor_pool_size=1)


def build_parser() -> argparse.ArgumentParser:
    parser, stage = job.job_parser("jobs.pseudo_masks", __doc__, "pseudo-mask options")
    add_options(stage)
    return parser


def _main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    options = job.stage_options(args, "pseudo_masks", DEFAULT_RESOURCES, unused=())
    job.check_positive(args, cpus_per_actor="must be positive")
    config = job.build_config(PseudoMaskConfig, args, config_fields(args))
    # Everything that can be refused is refused before Ray starts: an unfinished input, an
    # unsafe or foreign checkpoint, a class-space mismatch.
    source = read_manifest(options.input)
    released = released_model(args, options.storage)
    checkpoint = verify_checkpoint(args.checkpoint, options.storage, released)
    check_class_names(source, checkpoint)
    job.init_ray(args)
    result = run_pseudo_masks(*options.uris, checkpoint, config, **run_options(args, options))
    return job.result_status(result)


main, cli = job.entry_points(_main)

if __name__ == "__main__":
    cli()
