r"""Trains WeakCLIP on a refine output with Ray Train; writes model.pt, metrics and a manifest.

    python -m jobs.train --input s3://bucket/refine --output s3://bucket/train --model tiny \
        --iterations 200 --batch-size 4 --num-workers 2 [--clip-weights URI] [--resume]

`--config FILE` holds fields of `weakclip.config.WeakCLIPConfig` (e.g. `{"train": {"lr":
1e-3}}`); flags override it.
"""

import sys

from pipelines import cli as common
from pipelines.training import options as opts
from weakclip.config import PROFILES

CLIP = {"metavar": "URI", "help": "CLIP weights file (default: random)"}
CRF = {"type": int, "metavar": "N", "help": "CRF pool size per worker"}
PROFILE = {"choices": PROFILES, "help": "released: the authors' code's behaviour (D1-D9)"}
FLAGS = {"--resume": [("--clip-weights", CLIP)], "--device": [("--crf-processes", CRF)]}
FLAGS[""] = [("--profile", PROFILE)]


def build_parser() -> opts.argparse.ArgumentParser:
    return opts.training_parser("train", __doc__.split("\n")[0], 1000, FLAGS, model=True)


def _main(argv: list[str]) -> int:
    from pipelines.train import TrainJobConfig, TrainRefused, run_train
    from weakclip.config import WeakCLIPConfig, from_dict, preset, profile

    args = build_parser().parse_args(argv)
    common.reject_unused(args, "train", "actor_pool_size")
    job = common.job_options(args)
    file = args.config and common.load_config_file(args.config, common.storage_options(args))
    overrides = dict(file or {})
    flags = {k: v for k in ("iterations", "batch_size") if (v := getattr(args, k)) is not None}
    train = {**(overrides.get("train") or {}), **flags}
    with opts.usage_errors():
        base = profile(preset(args.model or "tiny"), args.profile)
        config = TrainJobConfig(
            input=job.input.uri,
            output=job.output.uri,
            model=from_dict({**overrides, "train": train}, WeakCLIPConfig, base=base),
            clip_weights=args.clip_weights,
            crf_processes=args.crf_processes,
            storage=job.storage,
            **opts.run_kwargs(args, job),
        )
    common.init_ray(args)
    try:
        result = run_train(config)
    except TrainRefused as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    status = opts.print_result("trained", result, job.output.uri)
    opts.print_report(job.output, job.storage)
    return status


main, cli = common.entry_points(_main)

if __name__ == "__main__":
    cli()
