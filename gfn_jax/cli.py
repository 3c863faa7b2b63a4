"""Command line: ``gfn-jax train | sample | eval | convert | bench | plan | sweep | report``.

Every command takes ``--help``; expected errors (configuration, paths, data, checkpoints,
model files) print one line saying what is wrong, where and what to do (the traceback with
``--debug`` or ``GFN_JAX_DEBUG=1``).
"""

from __future__ import annotations

import json
import os
import sys
from typing import Dict, List, Optional

from absl import flags

USAGE = """usage: gfn-jax COMMAND [flags]   (gfn-jax COMMAND --help lists a command's flags)

commands:
  train     fine-tune a policy from a config file (resumes a run directory)
  sample    draw samples from a trained run into a JSON-lines file
  eval      evaluate a trained run with its task's metrics
  convert   export a run (LoRA merged) or a model to a Hugging Face directory
  sweep     expand a config over a grid of keys: run, emit launch commands, summarize
  report    collect run directories into tables and plots (a results report)
  bench     time one training step's phases of a config: ms, tokens/s, FLOPs, MFU
  plan      the per-device memory of a config's train step and sampler, from shapes alone
            (no weights read); fails naming the keys to change where it does not fit

examples:
  gfn-jax train --config configs/rng.py --workdir runs/rng --config.train.steps=10
  gfn-jax sample --workdir runs/rng --num 100 --output samples.jsonl --temperature 1.0
  gfn-jax eval --workdir runs/rng --num 10000
  gfn-jax convert --workdir runs/rng --out exported/rng
  gfn-jax bench --config configs/rng.py --steps 5 --json bench.json
  gfn-jax plan --config configs/rng.py --config.memory.device_gb=80
"""

EXIT_ERROR, EXIT_USAGE, EXIT_PREEMPTED = 1, 2, 3
_COMMAND_LINE = ""  # the command being run (recorded in summary.json)


def _common(fv: flags.FlagValues) -> None:
    flags.DEFINE_bool("debug", False, "show full tracebacks for errors", flag_values=fv)


def _define_train(fv: flags.FlagValues, argv: List[str]) -> None:
    from ml_collections import config_flags

    config_flags.DEFINE_config_file(
        "config", None, "ml_collections config file (configs/*.py); override any key with "
        "--config.KEY=VALUE (e.g. --config.train.steps=10)", flag_values=fv, lock_config=True,
        sys_argv=argv)
    flags.DEFINE_string("workdir", None, "run directory (checkpoints, metrics, plots)",
                        flag_values=fv)
    flags.DEFINE_bool("progress", True, "show progress bars", flag_values=fv)
    flags.DEFINE_bool("resume", True, "resume from the latest checkpoint in --workdir; "
                      "--noresume starts a fresh run (refused on a used directory unless "
                      "--move_aside)", flag_values=fv)
    flags.DEFINE_bool("move_aside", False, "with --noresume: rename an existing run in "
                      "--workdir to WORKDIR.old-TIMESTAMP first", flag_values=fv)
    flags.DEFINE_bool("allow_config_change", False, "resume even though the config changes "
                      "the run's meaning (learning rate, seed, objective, ...)", flag_values=fv)
    flags.DEFINE_bool("force_unlock", False, "take the run directory's lock even if another "
                      "process seems to hold it", flag_values=fv)
    _common(fv)


def _define_sample(fv: flags.FlagValues, argv: List[str]) -> None:
    flags.DEFINE_string("workdir", None, "a run directory written by `gfn-jax train`",
                        flag_values=fv)
    flags.DEFINE_integer("num", 100, "number of samples in all (cycling through the prompts)",
                         flag_values=fv)
    flags.DEFINE_string("output", None, "output JSON-lines file (one object per sample: "
                        "prompt, text, tokens, log_q)", flag_values=fv)
    flags.DEFINE_float("temperature", 1.0, "sampling temperature", flag_values=fv)
    flags.DEFINE_string("prompt", None, "prompt text (default: the task's evaluation prompts); "
                        "any prompt that fits the model's context", flag_values=fv)
    flags.DEFINE_integer("seed", 0, "PRNG seed", flag_values=fv)
    flags.DEFINE_integer("batch_size", 0, "samples per sampler call (0: config.eval.batch_size)",
                         flag_values=fv)
    _common(fv)


def _define_eval(fv: flags.FlagValues, argv: List[str]) -> None:
    flags.DEFINE_string("workdir", None, "a run directory written by `gfn-jax train`",
                        flag_values=fv)
    flags.DEFINE_integer("num", 0, "number of samples (0: config.eval.num_samples)",
                         flag_values=fv)
    flags.DEFINE_integer("seed", 0, "PRNG seed", flag_values=fv)
    _common(fv)


def _define_convert(fv: flags.FlagValues, argv: List[str]) -> None:
    flags.DEFINE_string("model", None, "model spec: HF dir, .gguf file or registered name "
                        "(without --workdir)", flag_values=fv)
    flags.DEFINE_string("workdir", None, "a run directory whose LoRA adapters (or fine-tuned "
                        "weights) are merged into the export", flag_values=fv)
    flags.DEFINE_string("out", None, "output Hugging Face directory (new or empty)",
                        flag_values=fv)
    flags.DEFINE_bool("overwrite", False, "replace a non-empty --out directory", flag_values=fv)
    _common(fv)


def _define_plan(fv: flags.FlagValues, argv: List[str]) -> None:
    from ml_collections import config_flags

    config_flags.DEFINE_config_file(
        "config", None, "ml_collections config file (configs/*.py); override any key with "
        "--config.KEY=VALUE (e.g. --config.memory.device_gb=80 --config.mesh.fsdp=8)",
        flag_values=fv, lock_config=True, sys_argv=argv)
    flags.DEFINE_string("json", None, "write the plan's figures to this JSON file",
                        flag_values=fv)
    flags.DEFINE_string(
        "target", None, "plan for this TPU slice instead of this host's devices, compiled by "
        "the TPU compiler without the hardware (needs pip install \"gfn-jax[tpu]\"): an "
        "accelerator type (v5p-64, v4-32, v5litepod-8, v6e-16) or a topology (v5p:4x4x2)",
        flag_values=fv)
    _common(fv)


def _define_bench(fv: flags.FlagValues, argv: List[str]) -> None:
    from ml_collections import config_flags

    config_flags.DEFINE_config_file(
        "config", None, "ml_collections config file (configs/*.py); override any key with "
        "--config.KEY=VALUE (e.g. --config.train.samples_per_prompt=8)", flag_values=fv,
        lock_config=True, sys_argv=argv)
    flags.DEFINE_integer("steps", 5, "timed calls of each phase (the median is reported)",
                         flag_values=fv)
    flags.DEFINE_integer("warmup", 1, "untimed calls of each phase before timing; the first "
                         "(compilation) is reported apart", flag_values=fv)
    flags.DEFINE_string("json", None, "write every figure to this JSON file", flag_values=fv)
    flags.DEFINE_string("device-peak", None, "peak FLOP/s of one device for MFU: a name (H100 "
                        "SXM, H200, A100, TPU v4, TPU v5e, TPU v5p, TPU v6e, cpu = measure) or "
                        "a number (e.g. 989e12); default: detected from the device (CPU: a "
                        "measured float32 matmul)", flag_values=fv)
    flags.DEFINE_string("device-bandwidth", None, "memory bandwidth of one device in bytes/s "
                        "for the decode roofline: a name (as --device-peak), cpu = measure, "
                        "or a number (e.g. 3.35e12); default: detected from the device (CPU: "
                        "a measured sum over a 512 MB array)", flag_values=fv)
    flags.DEFINE_string("trace-dir", None, "also call each phase once under jax.profiler.trace "
                        "into DIR/<phase> (Perfetto traces) and report its kernels: the share "
                        "of the wall with a kernel running and the top kernel kinds",
                        flag_values=fv)
    _common(fv)


class UsageError(Exception):
    """A command-line mistake (exit status 2)."""


def _need(fv: flags.FlagValues, *names: str) -> None:
    missing = [n for n in names if getattr(fv, n) is None]
    if missing:
        raise UsageError("missing required flag(s): " + ", ".join("--" + m for m in missing))


def _positive(fv: flags.FlagValues, *names: str) -> None:
    for n in names:
        v = getattr(fv, n)
        if v is not None and v <= 0:
            raise UsageError(f"--{n} must be > 0, got {v}")


def _load_run(workdir: str):
    """(config, task, policy, base params) of a run directory; no optimizer state is built."""
    from gfn_jax.checkpoint import Checkpointer
    from gfn_jax.policy import load_run

    if not os.path.isfile(os.path.join(workdir, "config.json")):
        raise UsageError(f"{workdir!r} is not a gfn-jax run directory (no config.json); "
                         "run `gfn-jax train` first")
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"))
    if ckpt.latest_step() is None:
        raise UsageError(f"no checkpoint in {os.path.join(workdir, 'checkpoints')!r}; the run "
                         "has not saved one yet")
    from gfn_jax.compile_cache import enable_compilation_cache

    out = load_run(workdir)
    enable_compilation_cache(out[0].train.get("compilation_cache", "auto"))  # before sampling
    return out


def _read_json(path: str) -> Optional[dict]:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def cmd_train(fv: flags.FlagValues) -> int:
    _need(fv, "config", "workdir")
    import jax

    from gfn_jax.defaults import validate_config
    from gfn_jax.hostmem import process_usage, usage_since
    from gfn_jax.rundir import RunLock, check_config_change, prepare_fresh_run
    from gfn_jax.train import NonFiniteLossError, Trainer, _jsonable

    config = fv.config
    validate_config(config)  # before any model is loaded or compiled
    from gfn_jax.compile_cache import enable_compilation_cache

    enable_compilation_cache(config.train.get("compilation_cache", "auto"))
    workdir = os.path.abspath(fv.workdir)
    os.makedirs(workdir, exist_ok=True)
    primary = jax.process_index() == 0
    with RunLock(workdir, is_primary=primary, force=fv.force_unlock,
                 force_hint="--force_unlock") as lock:
        if getattr(lock, "took_over", None):
            print(f"note: took over a stale lock: {lock.took_over['reason']}")
        if not fv.resume and primary:
            moved = prepare_fresh_run(workdir, "move_aside" if fv.move_aside else "refuse",
                                      lock=lock)
            if moved:
                print(f"moved the previous run to {moved}")
        old_cfg = _read_json(os.path.join(workdir, "config.json")) if fv.resume else None
        if old_cfg is not None:
            change = check_config_change(old_cfg, _jsonable(config.to_dict()),
                                         allow=fv.allow_config_change)
            change.raise_if_refused()
        trainer = Trainer(config, workdir, restore=fv.resume)
        fb = getattr(trainer.ckpt, "last_fallback", None)
        if fb is not None:
            print(f"warning: {fb.message}")
        summary_path = os.path.join(workdir, "summary.json")
        old_summary = _read_json(summary_path) or {}
        if trainer.start_step > 0:
            if trainer.start_step >= config.train.steps and old_summary.get("complete"):
                print(f"the run in {workdir} is already complete at step {trainer.start_step} "
                      f"(summary.json kept); raise --config.train.steps to continue it or "
                      f"use a new --workdir")
                return 0
            print(f"resuming from step {trainer.start_step} of {config.train.steps}")
        if primary and os.path.exists(os.path.join(workdir, "DONE")):
            os.remove(os.path.join(workdir, "DONE"))  # the run goes on: not finished any more
        results: Dict[str, Dict[str, float]] = dict((old_summary.get("eval") or {})
                                                    if trainer.start_step > 0 else {})
        results.pop("after", None)
        evaluate = config.eval.num_samples > 0
        usage: Dict[str, Dict[str, float]] = {}  # host CPU time and page faults per phase
        if evaluate and config.eval.before_training and trainer.start_step == 0:
            u0 = process_usage()
            results["before"] = _evaluate(trainer, config.eval.num_samples, "before",
                                          progress=fv.progress)
            usage["eval_before"] = usage_since(u0)
        try:
            summary = trainer.run(progress=fv.progress)
        except NonFiniteLossError as e:
            latest = trainer.ckpt.latest_step()
            where = (f"the last checkpoint on disk (step {latest}) is clean" if latest is not None
                     else "no checkpoint was saved before it")
            print(f"error: {e}; {where}", file=sys.stderr)
            return EXIT_ERROR
        summary["eval"] = results
        preempted = "preempted_at" in summary
        if evaluate and not preempted:
            u0 = process_usage()
            results["after"] = _evaluate(trainer, config.eval.num_samples, "after",
                                         progress=fv.progress)
            usage["eval_after"] = usage_since(u0)
        summary["host_usage"] = dict(usage, **summary.get("host_usage", {}),
                                     whole_process=process_usage())
        summary["complete"] = not preempted
        summary["command"] = _COMMAND_LINE or "gfn-jax train"
        from gfn_jax.baselines import hardware

        summary["hardware"] = hardware()
        if primary:
            from gfn_jax.rundir import atomic_write_file

            with atomic_write_file(summary_path) as f:
                f.write(json.dumps(_jsonable(summary), indent=2))
            if "after" in results:  # metrics.png was drawn before this evaluation: redraw
                _replot(workdir)
            if not preempted:  # the marker sweeps and launchers look for
                open(os.path.join(workdir, "DONE"), "w").close()
        print(json.dumps(_jsonable({"steps": summary.get("steps"),
                                    "wall_time_s": summary.get("wall_time_s"),
                                    "eval": results}), indent=2))
        if preempted:
            print(f"preempted at step {summary['preempted_at']}: checkpoint saved; run the same "
                  f"command again to resume", file=sys.stderr)
            return EXIT_PREEMPTED
    return 0


def _replot(workdir: str) -> None:
    try:
        from gfn_jax.metrics import plot_metrics

        plot_metrics(workdir)
    except Exception as e:  # noqa: BLE001 - plots are a convenience, never fatal
        print(f"warning: could not plot metrics: {e}", file=sys.stderr)


def _evaluate(trainer, num: int, tag: str, seed: int = 1234,
              progress: bool = True) -> Dict[str, float]:
    return _evaluate_policy(trainer.config, trainer.task, trainer.policy, trainer.workdir, num,
                            tag, seed, progress=progress)


def _evaluate_policy(config, task, policy, workdir: str, num: int, tag: str,
                     seed: int = 1234, progress: bool = True) -> Dict[str, float]:
    import time

    t0 = time.time()
    direct = task.evaluate_policy(policy)
    if direct is not None:  # the task evaluates the policy itself (labels, votes, ...)
        metrics = dict(direct)
        metrics["eval_time_s"] = time.time() - t0
        with open(os.path.join(workdir, f"eval_{tag}.json"), "w") as f:
            json.dump(metrics, f, indent=2)
        print(f"eval ({tag}):", json.dumps(metrics))
        return metrics
    label = {"before": "evaluating the base model", "after": "evaluating the tuned policy"}
    samples = policy.sample_total(list(task.eval_prompts()), num,
                                  batch_size=int(config.eval.batch_size), seed=seed,
                                  temperature=float(config.eval.get("temperature", 1.0)),
                                  progress=progress, desc=label.get(tag, f"evaluating ({tag})"))
    metrics = task.evaluate(samples, out_dir=workdir, tag=tag)
    metrics["eval_time_s"] = time.time() - t0
    with open(os.path.join(workdir, f"eval_{tag}.json"), "w") as f:
        json.dump(metrics, f, indent=2)
    print(f"eval ({tag}):", json.dumps(metrics))
    return metrics


def cmd_sample(fv: flags.FlagValues) -> int:
    _need(fv, "workdir", "output")
    _positive(fv, "num", "temperature")
    if fv.batch_size < 0:
        raise UsageError(f"--batch_size must be >= 0, got {fv.batch_size}")
    from gfn_jax.rundir import atomic_write_file, check_writable

    check_writable(fv.output, flag="--output")  # before anything expensive
    config, task, policy, _ = _load_run(fv.workdir)
    prompts = [fv.prompt] if fv.prompt is not None else list(task.eval_prompts())
    bs = fv.batch_size or int(config.eval.batch_size)
    samples = policy.sample_total(prompts, fv.num, batch_size=bs, temperature=fv.temperature,
                                  seed=fv.seed, progress=True)
    with atomic_write_file(fv.output) as f:
        for s in samples:
            f.write(json.dumps(s) + "\n")
    print(f"wrote {len(samples)} samples to {fv.output}")
    return 0


def cmd_eval(fv: flags.FlagValues) -> int:
    _need(fv, "workdir")
    _positive(fv, "num") if fv.num != 0 else None
    if fv.num < 0:
        raise UsageError(f"--num must be > 0 (or 0 for config.eval.num_samples), got {fv.num}")
    config, task, policy, base = _load_run(fv.workdir)
    task.bind_reward_params(base)
    from gfn_jax.checkpoint import Checkpointer

    step = Checkpointer(os.path.join(fv.workdir, "checkpoints")).latest_step()
    num = fv.num or config.eval.num_samples
    if num <= 0:
        raise UsageError("the run's config.eval.num_samples is 0: pass --num")
    _evaluate_policy(config, task, policy, fv.workdir, num, f"step{step}", seed=fv.seed)
    return 0


def cmd_convert(fv: flags.FlagValues) -> int:
    _need(fv, "out")
    from gfn_jax.models import hf
    from gfn_jax.rundir import atomic_output_dir, check_output_dir

    forbid = [fv.workdir] if fv.workdir else []
    check_output_dir(fv.out, overwrite=fv.overwrite, forbid_inside=forbid, flag="--out")
    if fv.workdir:
        _, _, policy, _ = _load_run(fv.workdir)
        with atomic_output_dir(fv.out, overwrite=fv.overwrite, forbid_inside=forbid) as tmp:
            policy.save_hf(tmp)
    else:
        _need(fv, "model")
        from gfn_jax.models import load

        m = load(fv.model)
        with atomic_output_dir(fv.out, overwrite=fv.overwrite) as tmp:
            hf.save_hf(m.config, m.params, tmp, tokenizer=m.tokenizer)
    print(f"wrote Hugging Face checkpoint to {fv.out}")
    return 0


def cmd_bench(fv: flags.FlagValues) -> int:
    _need(fv, "config")
    _positive(fv, "steps", "warmup")
    from ml_collections import config_flags

    from gfn_jax import bench
    from gfn_jax.defaults import validate_config
    from gfn_jax.rundir import atomic_write_file, check_writable
    from gfn_jax.train import _jsonable

    config = fv.config
    validate_config(config)  # before any model is loaded or compiled
    peak = fv["device-peak"].value
    if peak is not None:  # a bad name fails now, not after the compilations
        try:
            bench.resolve_peak(peak, None, str(config.model.dtype), measure=lambda: 0.0)
        except ValueError as e:
            raise UsageError(str(e)) from None
    bandwidth = fv["device-bandwidth"].value
    if bandwidth is not None:
        try:
            bench.resolve_bandwidth(bandwidth, None, measure=lambda: 0.0)
        except ValueError as e:
            raise UsageError(str(e)) from None
    if fv.json:
        check_writable(fv.json, flag="--json")
    trace_dir = fv["trace-dir"].value
    if trace_dir:
        try:
            os.makedirs(trace_dir, exist_ok=True)
        except OSError as e:
            raise UsageError(f"--trace-dir={trace_dir}: cannot create it ({e.strerror}); "
                             "pass a writable directory") from None
    name = config_flags.get_config_filename(fv["config"])
    overrides = config_flags.get_override_values(fv["config"])
    if overrides:
        name += " (" + ", ".join(f"{k}={v}" for k, v in sorted(overrides.items())) + ")"
    result = bench.run_bench(config, steps=fv.steps, warmup=fv.warmup, device_peak=peak,
                             device_bandwidth=bandwidth, trace_dir=trace_dir,
                             config_name=name, command=_COMMAND_LINE or "gfn-jax bench")
    print(bench.format_report(result))
    if fv.json:
        with atomic_write_file(fv.json, flag="--json") as f:
            f.write(json.dumps(_jsonable(result), indent=2))
        print(f"wrote {fv.json}")
    return 0


def cmd_plan(fv: flags.FlagValues) -> int:
    _need(fv, "config")
    import jax

    from gfn_jax.defaults import mesh_devices, validate_config
    from gfn_jax.memory import memory_limit_bytes
    from gfn_jax.rundir import atomic_write_file, check_writable
    from gfn_jax.train import _jsonable, plan_devices, plan_run

    config = fv.config
    validate_config(config)
    if fv.json:
        check_writable(fv.json, flag="--json")
    if fv.target:
        from gfn_jax.targets import parse_target

        target = parse_target(fv.target)
        _compile_only_host()
        print(f"target {target.describe()}; compiled by the TPU compiler on this host")
        devices = plan_devices(config, target)
    else:
        devices = mesh_devices(config) or jax.devices()
    plan = plan_run(config, devices)  # prints the plan; raises DoesNotFitError naming the knobs
    # what the plan was checked against: memory.device_gb, else what the device reports
    limit = memory_limit_bytes(config.memory.device_gb, devices[0])
    print("fits" + (f" {float(config.memory.headroom):.0%} of {limit / 1e9:.1f} GB"
                    if limit else " (the device reports no memory limit: nothing to check "
                    "against; pass --config.memory.device_gb)"))
    if fv.json:
        with atomic_write_file(fv.json, flag="--json") as f:
            f.write(json.dumps(_jsonable(dict(plan.as_dict(), target=fv.target or None)),
                               indent=2))
        print(f"wrote {fv.json}")
    return 0


def _compile_only_host() -> None:
    """A plan for a target runs nothing: keep JAX's own backend on the CPU (where
    ``JAX_PLATFORMS`` does not choose), so that planning another slice on a TPU or GPU host
    does not take that host's own accelerator (a training run there may hold it)."""
    import jax
    from jax._src import xla_bridge

    if not os.environ.get("JAX_PLATFORMS") and not xla_bridge.backends_are_initialized():
        jax.config.update("jax_platforms", "cpu")


COMMANDS: Dict[str, tuple] = {
    "train": (_define_train, cmd_train),
    "sample": (_define_sample, cmd_sample),
    "eval": (_define_eval, cmd_eval),
    "convert": (_define_convert, cmd_convert),
    "bench": (_define_bench, cmd_bench),
    "plan": (_define_plan, cmd_plan),
}


def _command_help(cmd: str, fv: flags.FlagValues) -> str:
    lines = [f"usage: gfn-jax {cmd} [flags]", "", "flags:"]
    seen = set()
    for name in sorted(fv):
        flag = fv[name]
        if id(flag) in seen or name in ("help", "helpshort", "helpfull", "helpxml", "flagfile",
                                        "undefok"):
            continue
        seen.add(id(flag))
        default = "" if flag.default is None else f" (default: {flag.default!r})"
        kind = "--[no]" if isinstance(flag, flags.BooleanFlag) else "--"
        lines.append(f"  {kind}{name}: {flag.help}{default}")
    return "\n".join(lines)


def _expected_errors() -> tuple:
    from gfn_jax.checkpoint import CheckpointError
    from gfn_jax.rundir import RunDirError

    errs = [ValueError, OSError, KeyError, MemoryError, CheckpointError, RunDirError,
            UsageError]
    try:
        from gfn_jax.train import NonFiniteLossError

        errs.append(NonFiniteLossError)
    except ImportError:  # pragma: no cover
        pass
    return tuple(errs)


def _one_line(e: BaseException) -> str:
    from gfn_jax.checkpoint import CheckpointError
    from gfn_jax.rundir import RunDirError, find_os_error, one_line_os_error

    if isinstance(e, (RunDirError, CheckpointError)):
        # their messages already say what failed, where and what to do (also when an OSError
        # caused them): rewording the cause would lose that ("disk full while saving
        # checkpoint step 3 to ...; the previous checkpoints are intact")
        return " ".join(str(e).split()) or type(e).__name__
    if isinstance(e, OSError) or find_os_error(e) is not None:
        ose = e if isinstance(e, OSError) else find_os_error(e)
        return one_line_os_error(ose, "running the command", getattr(ose, "filename", None),
                                 "--workdir")
    msg = str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)
    return msg.strip() or type(e).__name__


def _unknown_key_message(e: BaseException, args: List[str]) -> str:
    """``unknown config key train.stepz (did you mean train.steps?)`` from ml_collections'
    KeyError (possibly wrapped in an AttributeError) and the ``--config.*`` overrides."""
    import re

    inner: object = e
    while isinstance(inner, BaseException) and inner.args:
        inner = inner.args[0]
    text = str(inner)
    m = re.match(r"""\s*['"]?([^'"\n]+)""", text)
    bad = m.group(1).strip() if m else ""
    close = re.search(r'Did you mean "([^"]+)"', text)
    paths = [a[len("--config."):].split("=")[0].split(".") for a in args
             if a.startswith("--config.")]
    key, hint = bad, ""
    for parts in paths:
        if bad in parts:
            i = parts.index(bad)
            key = ".".join(parts[:i + 1])
            if close:
                hint = f" (did you mean {'.'.join(parts[:i] + [close.group(1)])}?)"
            break
    else:
        if close:
            hint = f" (did you mean {close.group(1)}?)"
    return f"unknown config key {key or text}{hint}"


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point of the ``gfn-jax`` console command."""
    argv = list(sys.argv if argv is None else argv)
    if len(argv) < 2 or argv[1] in ("-h", "--help", "help"):
        print(USAGE)
        return 0
    cmd = argv[1]
    from gfn_jax.targets import quiet_tpu_probe

    quiet_tpu_probe()  # libtpu installed (the tpu extra) on a host without a TPU
    if cmd == "sweep":
        from gfn_jax.sweep import main as sweep_main

        return sweep_main(argv[2:])
    if cmd == "report":
        from gfn_jax.report import main as report_main

        return report_main(argv[2:])
    if cmd not in COMMANDS:
        print(f"error: unknown command {cmd!r}; choose one of {', '.join(COMMANDS)}\n\n{USAGE}",
              file=sys.stderr)
        return EXIT_USAGE
    from gfn_jax.hostmem import keep_freed_memory

    try:  # before JAX starts XLA's threads: reuse freed host memory (GFN_JAX_MALLOC)
        keep_freed_memory()
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    define, run = COMMANDS[cmd]
    global _COMMAND_LINE
    import shlex

    _COMMAND_LINE = " ".join(shlex.quote(a) for a in ["gfn-jax"] + argv[1:])
    fv = flags.FlagValues()
    rest = argv[2:]
    args = [f"gfn-jax {cmd}"] + [a for a in rest if a not in ("-h", "--help", "-help")]
    if len(args) != len(rest) + 1:  # --help: the command's flags, nothing else
        define(fv, [args[0]])
        print(_command_help(cmd, fv))
        return 0
    define(fv, args)
    debug = os.environ.get("GFN_JAX_DEBUG", "") not in ("", "0") or "--debug" in rest
    try:
        fv(args)
    except flags.Error as e:
        print(f"error: {e} (see gfn-jax {cmd} --help)", file=sys.stderr)
        return EXIT_USAGE
    except (KeyError, AttributeError) as e:
        print(f"error: {_unknown_key_message(e, args)}", file=sys.stderr)
        return EXIT_USAGE
    except Exception as e:  # noqa: BLE001 - e.g. an error inside the config file itself
        if debug:
            raise
        print(f"error: could not load the config: {type(e).__name__}: {e}", file=sys.stderr)
        return EXIT_USAGE
    try:
        return run(fv)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_PREEMPTED
    except _expected_errors() as e:
        if debug:
            raise
        print(f"error: {_one_line(e)}", file=sys.stderr)
        print("(run with --debug or GFN_JAX_DEBUG=1 for the traceback)", file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
