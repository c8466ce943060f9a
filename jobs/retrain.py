r"""Retrain a fully supervised DeepLabV3 on pseudo masks with Ray Train; score it on val GT.

    python -m jobs.retrain --input s3://bucket/run/pseudo_masks --output s3://bucket/run/retrain \
        [--architecture small|resnet50|resnet101|mobilenet_v3_large] [--backbone-weights URI] \
        [--iterations N] [--batch-size N] [--crop-size S] [--num-workers W] [--resume] \
        [--wait-timeout SECONDS] [--config retrain.yaml]

Waits up to `--wait-timeout` seconds for the pseudo-mask output's `_SUCCESS`, reads only the
files its manifest (and its input's manifest) lists, and writes `model.pt`, `metrics.json`
(val mIoU on images never trained on), `quarantine/` for unusable masks, the manifest and
`_SUCCESS`. `--config FILE` holds fields of `pipelines.retrain.RetrainConfig`; flags override
it. Exit status: 0 success; 1 failure with a one-line reason on stderr; 2 usage error.
"""

from pipelines import cli as common
from pipelines.retrain import RetrainConfig, RetrainOptions, run_retrain
from pipelines.retrain.stage import ARCHITECTURES, micro_batching, read_inputs
from pipelines.training import options as opts

WAIT = "how long to wait for the input's _SUCCESS (default 600; 0 = check once)"
WEIGHTS = "backbone weights file (default: random init)"
FLAGS = {
    "--iterations": [
        ("--architecture", {"choices": ARCHITECTURES, "help": "network (default small)"}),
        ("--backbone-weights", {"metavar": "URI", "help": WEIGHTS}),
    ],
    "--num-workers": [
        ("--lr", {"type": float, "metavar": "LR", "help": "AdamW peak learning rate"}),
        ("--crop-size", {"type": int, "metavar": "S", "help": "square training crop side"}),
    ],
    "": [("--wait-timeout", {"type": float, "default": 600.0, "metavar": "SECONDS", "help": WAIT})],
}


def build_parser() -> opts.argparse.ArgumentParser:
    return opts.training_parser("retrain", __doc__, 500, FLAGS, group=True)


def _main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    names = ("architecture", "backbone_weights", "iterations", "batch_size", "lr", "crop_size")
    config = common.build_config(RetrainConfig, args, common.given(args, *names))
    job = common.job_options(args)
    with opts.usage_errors():
        run = RetrainOptions(wait_timeout_s=args.wait_timeout, **opts.run_kwargs(args, job))
        micro_batching(config, run)
    inputs = read_inputs(job.input.uri, storage=job.storage, wait_timeout_s=args.wait_timeout)
    common.init_ray(args)  # after everything that can be refused
    result = run_retrain(
        job.input.uri, job.output.uri, config, options=run, storage=job.storage, inputs=inputs
    )
    status = opts.print_result("retrained", result, job.output.uri)
    opts.print_report(job.output, job.storage)
    return status


main, cli = common.entry_points(_main)

if __name__ == "__main__":
    cli()
