"""Tasks: prompts, policy constraints, rewards and metrics; one small module per task.

Each task class declares its config schema in ``DEFAULTS`` (the one place its defaults live);
``config.task`` holds ``name`` plus those keys. :func:`make_task` merges the defaults and
rejects unknown keys, naming the task and the close matches.
"""

from typing import Any, Callable, Dict, Mapping, Optional

from gfn_jax.tasks.base import Target, Task

_TASKS: Dict[str, Callable[..., Task]] = {}

__all__ = ["Task", "Target", "register_task", "make_task", "task_defaults", "task_names",
           "check_task_config"]


def register_task(name: str, factory: Callable[..., Task]) -> None:
    """Register a task class (or factory with a ``DEFAULTS`` dict) under ``name``."""
    _TASKS[name] = factory


def task_names() -> tuple:
    """Registered task names, sorted."""
    return tuple(sorted(_TASKS))


def _factory(name: Any) -> Callable[..., Task]:
    if name not in _TASKS:
        import difflib

        close = difflib.get_close_matches(str(name), list(_TASKS), n=3)
        hint = f" (did you mean {', '.join(map(repr, close))}?)" if close else ""
        raise ValueError(f"task.name={name!r} is not a registered task{hint}; registered "
                         f"tasks: {', '.join(task_names())}")
    return _TASKS[name]


def task_defaults(name: str) -> Dict[str, Any]:
    """A copy of task ``name``'s config schema (every key with its default)."""
    return dict(getattr(_factory(name), "DEFAULTS", {}))


def _as_dict(config: Any) -> Dict[str, Any]:
    if hasattr(config, "to_dict"):
        return dict(config.to_dict())
    return dict(config)


def check_task_config(config: Any) -> Dict[str, Any]:
    """The task config merged over its schema; ``ValueError`` naming unknown keys."""
    from gfn_jax.defaults import _unknown_keys_message

    d = _as_dict(config)
    name = d.pop("name", None)
    defaults = task_defaults(name)
    unknown = sorted(set(d) - set(defaults))
    if unknown:
        raise ValueError(_unknown_keys_message(f"task {name!r}", [f"task.{k}" for k in unknown],
                                               {f"task.{k}": v for k, v in defaults.items()}))
    return {"name": name, **defaults, **d}


def make_task(config: Any, data_root: str = "") -> Task:
    """Build the task named by ``config.name`` with its schema's defaults filled in;
    relative data paths resolve against ``data_root`` (default: the working directory)."""
    merged = check_task_config(config)
    return _factory(merged["name"])(_ConfigView(merged, data_root))


class _ConfigView(Mapping):
    """A read-only mapping with ``.get`` and attribute access over the merged task config."""

    def __init__(self, d: Dict[str, Any], data_root: str = "") -> None:
        self._d = d
        self.data_root = str(data_root or "")

    def __getitem__(self, k: str) -> Any:
        return self._d[k]

    def __iter__(self):
        return iter(self._d)

    def __len__(self) -> int:
        return len(self._d)

    def __getattr__(self, k: str) -> Any:
        if k.startswith("_"):
            raise AttributeError(k)
        try:
            return self._d[k]
        except KeyError:
            raise AttributeError(k) from None

    def get(self, k: str, default: Optional[Any] = None) -> Any:
        return self._d.get(k, default)

    def to_dict(self) -> Dict[str, Any]:
        return dict(self._d)


def _register_builtin() -> None:
    from gfn_jax.tasks.arithmetic import ArithmeticTask
    from gfn_jax.tasks.continuation import ContinuationTask
    from gfn_jax.tasks.infill import InfillTask
    from gfn_jax.tasks.rng import RandomNumberTask
    from gfn_jax.tasks.stories import StoriesTask
    from gfn_jax.tasks.subj import SubjCotTask, SubjLabelTask
    from gfn_jax.tasks.toy import ToyTask

    register_task("toy_exact", ToyTask)
    register_task("rng", RandomNumberTask)
    register_task("continuation", ContinuationTask)
    register_task("infill", InfillTask)
    register_task("infill_stories", StoriesTask)
    register_task("arithmetic", ArithmeticTask)
    register_task("subj_cot", SubjCotTask)
    register_task("subj_label", SubjLabelTask)


_register_builtin()
