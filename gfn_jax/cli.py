"""Command line: ``gfn-jax train | sample | eval | convert``.

Examples::

    gfn-jax train --config configs/rng.py --workdir runs/rng --config.train.steps=10
    gfn-jax sample --workdir runs/rng --num 100 --output samples.jsonl --temperature 1.0
    gfn-jax eval --workdir runs/rng --num 10000
    gfn-jax convert --model smollm2-135m --out exported/ [--workdir runs/rng]
"""

from __future__ import annotations

import json
import os
import sys
from typing import Dict, List, Optional

from absl import flags

USAGE = __doc__


def _define_train(fv: flags.FlagValues, argv: List[str]) -> None:
    from ml_collections import config_flags

    config_flags.DEFINE_config_file("config", None, "ml_collections config file (configs/*.py)",
                                    flag_values=fv, lock_config=True, sys_argv=argv)
    flags.DEFINE_string("workdir", None, "run directory (checkpoints, metrics, plots)",
                        flag_values=fv)
    flags.DEFINE_bool("progress", True, "show a progress bar", flag_values=fv)
    flags.DEFINE_bool("resume", True, "resume from the latest checkpoint in workdir",
                      flag_values=fv)


def _define_sample(fv: flags.FlagValues, argv: List[str]) -> None:
    flags.DEFINE_string("workdir", None, "a run directory written by `gfn-jax train`",
                        flag_values=fv)
    flags.DEFINE_integer("num", 100, "number of samples", flag_values=fv)
    flags.DEFINE_string("output", None, "output JSON-lines file", flag_values=fv)
    flags.DEFINE_float("temperature", 1.0, "sampling temperature", flag_values=fv)
    flags.DEFINE_string("prompt", None, "prompt text (default: the task's prompts)",
                        flag_values=fv)
    flags.DEFINE_integer("seed", 0, "PRNG seed", flag_values=fv)
    flags.DEFINE_integer("batch_size", 0, "samples per sampler call (0: config.eval)",
                         flag_values=fv)


def _define_eval(fv: flags.FlagValues, argv: List[str]) -> None:
    flags.DEFINE_string("workdir", None, "a run directory written by `gfn-jax train`",
                        flag_values=fv)
    flags.DEFINE_integer("num", 0, "number of samples (0: config.eval.num_samples)",
                         flag_values=fv)
    flags.DEFINE_integer("seed", 0, "PRNG seed", flag_values=fv)


def _define_convert(fv: flags.FlagValues, argv: List[str]) -> None:
    flags.DEFINE_string("model", None, "model spec: HF dir, .gguf file or registered name",
                        flag_values=fv)
    flags.DEFINE_string("workdir", None, "optional run directory whose LoRA adapters (or "
                        "fine-tuned weights) are merged into the export", flag_values=fv)
    flags.DEFINE_string("out", None, "output Hugging Face directory", flag_values=fv)


def _need(fv: flags.FlagValues, *names: str) -> None:
    missing = [n for n in names if getattr(fv, n) is None]
    if missing:
        raise SystemExit("error: missing required flag(s): " + ", ".join("--" + m for m in missing))


def _load_run_config(workdir: str):
    """The config a run was trained with (its config.json over the defaults)."""
    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        raise SystemExit(f"error: {workdir!r} is not a gfn-jax run directory (no config.json); "
                         "run `gfn-jax train` first")
    with open(path) as f:
        d = json.load(f)
    from gfn_jax.defaults import default_config

    cfg = default_config()
    _merge(cfg, d)
    return cfg


def _merge(cfg, d: Dict) -> None:
    import ml_collections

    for k, v in d.items():
        if isinstance(v, dict) and k in cfg and isinstance(cfg[k], ml_collections.ConfigDict):
            _merge(cfg[k], v)
        else:
            if isinstance(v, list):
                v = tuple(v)
            if k in cfg:
                with cfg.ignore_type():
                    cfg[k] = v
            else:
                cfg[k] = v


def _trainer_from_workdir(workdir: str):
    from gfn_jax.train import Trainer

    cfg = _load_run_config(workdir)
    trainer = Trainer(cfg, workdir, restore=True)
    if trainer.ckpt.latest_step() is None:
        raise SystemExit(f"error: no checkpoint in {os.path.join(workdir, 'checkpoints')!r}")
    return trainer


def cmd_train(fv: flags.FlagValues) -> int:
    _need(fv, "config", "workdir")
    from gfn_jax.train import Trainer

    config = fv.config
    trainer = Trainer(config, fv.workdir, restore=fv.resume)
    results: Dict[str, Dict[str, float]] = {}
    evaluate = config.eval.num_samples > 0
    if evaluate and config.eval.before_training and trainer.start_step == 0:
        results["before"] = _evaluate(trainer, config.eval.num_samples, "before")
    from gfn_jax.train import NonFiniteLossError

    try:
        summary = trainer.run(progress=fv.progress)
    except NonFiniteLossError as e:
        latest = trainer.ckpt.latest_step()
        print(f"error: {e}; the last checkpoint (step {latest}) is clean", file=sys.stderr)
        return 1
    if evaluate:
        results["after"] = _evaluate(trainer, config.eval.num_samples, "after")
    summary["eval"] = results
    from gfn_jax.train import _jsonable

    with open(os.path.join(trainer.workdir, "summary.json"), "w") as f:
        json.dump(_jsonable(summary), f, indent=2)
    print(json.dumps(_jsonable({"steps": summary.get("steps"),
                                "wall_time_s": summary.get("wall_time_s"), "eval": results}),
                     indent=2))
    return 0


def _evaluate(trainer, num: int, tag: str, seed: int = 1234) -> Dict[str, float]:
    import time

    t0 = time.time()
    samples = trainer.generate(num, seed=seed)
    metrics = trainer.task.evaluate(samples, out_dir=trainer.workdir, tag=tag)
    metrics["eval_time_s"] = time.time() - t0
    with open(os.path.join(trainer.workdir, f"eval_{tag}.json"), "w") as f:
        json.dump(metrics, f, indent=2)
    print(f"eval ({tag}):", json.dumps(metrics))
    return metrics


def cmd_sample(fv: flags.FlagValues) -> int:
    _need(fv, "workdir", "output")
    trainer = _trainer_from_workdir(fv.workdir)
    samples = trainer.generate(fv.num, prompt=fv.prompt, temperature=fv.temperature,
                               batch_size=fv.batch_size, seed=fv.seed)
    os.makedirs(os.path.dirname(os.path.abspath(fv.output)), exist_ok=True)
    with open(fv.output, "w") as f:
        for s in samples:
            f.write(json.dumps(s) + "\n")
    print(f"wrote {len(samples)} samples to {fv.output}")
    return 0


def cmd_eval(fv: flags.FlagValues) -> int:
    _need(fv, "workdir")
    trainer = _trainer_from_workdir(fv.workdir)
    num = fv.num or trainer.config.eval.num_samples
    _evaluate(trainer, num, f"step{int(trainer.state.step)}", seed=fv.seed)
    return 0


def cmd_convert(fv: flags.FlagValues) -> int:
    _need(fv, "out")
    from gfn_jax.models import hf
    from gfn_jax.models import lora as lora_lib

    if fv.workdir:
        trainer = _trainer_from_workdir(fv.workdir)
        params, adapters = trainer.policy_params
        if adapters is not None:
            params = lora_lib.merge_lora(params, adapters)
        hf.save_hf(trainer.model_cfg, params, fv.out, tokenizer=trainer.tokenizer)
    else:
        _need(fv, "model")
        from gfn_jax.models import load

        m = load(fv.model)
        hf.save_hf(m.config, m.params, fv.out, tokenizer=m.tokenizer)
    print(f"wrote Hugging Face checkpoint to {fv.out}")
    return 0


COMMANDS: Dict[str, tuple] = {
    "train": (_define_train, cmd_train),
    "sample": (_define_sample, cmd_sample),
    "eval": (_define_eval, cmd_eval),
    "convert": (_define_convert, cmd_convert),
}


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point of the ``gfn-jax`` console command."""
    argv = list(sys.argv if argv is None else argv)
    if len(argv) < 2 or argv[1] in ("-h", "--help", "help"):
        print(USAGE)
        return 0
    cmd = argv[1]
    if cmd not in COMMANDS:
        print(f"error: unknown command {cmd!r}; choose one of {sorted(COMMANDS)}\n{USAGE}",
              file=sys.stderr)
        return 2
    define, run = COMMANDS[cmd]
    fv = flags.FlagValues()
    args = [f"gfn-jax {cmd}"] + argv[2:]
    define(fv, args)
    try:
        fv(args)
    except flags.Error as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (KeyError, AttributeError) as e:
        bad = [a.split("=")[0] for a in args if a.startswith("--config.")]
        print(f"error: unknown config key {e} (in one of the overrides {bad}); "
              "see gfn_jax/defaults.py for every key", file=sys.stderr)
        return 2
    return run(fv)


if __name__ == "__main__":
    sys.exit(main())
