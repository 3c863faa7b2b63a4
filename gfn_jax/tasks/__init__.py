"""Tasks: prompts, policy constraints, rewards and metrics; one small module per task."""

from typing import Any, Callable, Dict

from gfn_jax.tasks.base import Task

_TASKS: Dict[str, Callable[[Any], Task]] = {}


def register_task(name: str, factory: Callable[[Any], Task]) -> None:
    """Register a task factory under ``name`` (used by ``config.task.name``)."""
    _TASKS[name] = factory


def make_task(config: Any) -> Task:
    """Build the task named by ``config.name``."""
    name = config.get("name")
    if name not in _TASKS:
        raise ValueError(f"unknown task {name!r}; registered tasks: {sorted(_TASKS)}")
    return _TASKS[name](config)


def _register_builtin() -> None:
    from gfn_jax.tasks.continuation import ContinuationTask
    from gfn_jax.tasks.infill import InfillTask
    from gfn_jax.tasks.rng import RandomNumberTask
    from gfn_jax.tasks.toy import ToyTask

    register_task("toy_exact", ToyTask)
    register_task("rng", RandomNumberTask)
    register_task("continuation", ContinuationTask)
    register_task("infill", InfillTask)


_register_builtin()
