"""gfn-jax: GFlowNet fine-tuning of large language models in JAX.

Public API (see ``docs/architecture.md``):

* models: :func:`load`, :func:`forward`, :class:`ModelConfig`, :func:`init_params`,
  :func:`load_hf`, :func:`save_hf`, :func:`load_gguf`, LoRA (:class:`LoraConfig`,
  :func:`init_lora`, :func:`merge_lora`)
* sampling and scoring: :class:`PolicySpec`, :func:`sample`, :func:`score_policy`,
  :func:`score_reward_prefixes`, :func:`score_suffix_prefixes`
* objectives: :func:`subtb_loss`, :func:`tb_loss`, :func:`db_loss`, :func:`sft_loss`,
  :func:`reinforce_loss`, :func:`ppo_loss`
* objectives as registered values: :class:`Objective`, :class:`Needs`,
  :class:`LossInputs`, :func:`register_objective`, :func:`get_objective`,
  :func:`objective_names`
* the policy as a value: :class:`Policy`, :func:`load_policy`, :func:`load_run`
* decoding baselines: :func:`greedy`, :func:`beam_search`, :func:`diverse_beam_search`,
  :func:`sample_pure`, :func:`sample_tempered`, :func:`sample_nucleus`; text metrics
  (:func:`bleu4`, :func:`gleu`, :func:`distinct_n`, :func:`embedding_diversity`)
* data: :func:`open_source` (text, JSON lines, TFDS), :class:`ShardedStream`; the
  calculator tool (:class:`CalculatorTool`, :func:`evaluate_expression`)
* training: :class:`TrainBatch`, :class:`StepSpec`, :func:`make_train_step`,
  :class:`Trainer`, :class:`ReplayBuffer`, :class:`Checkpointer`, tasks (:class:`Task`,
  :class:`Target`, :func:`make_task`, :func:`register_task`), parallelism
  (:class:`MeshConfig`, :func:`make_mesh`, :func:`to_host`)
* memory planning on abstract shapes: :func:`plan_run` (a run config's
  :class:`MemoryPlan`, no weight read), :func:`estimate_step_memory`,
  :func:`estimate_sampler_memory`, :class:`MemoryEstimate`, :class:`DoesNotFitError`;
  for a TPU slice compiled by the TPU compiler on any host: :func:`parse_target`,
  :class:`TpuTarget`, :class:`TargetError` (``plan_run(config, target="v5p-64")``, or
  ``"2xv5p-64"`` for two slices); what a compiled program sends between devices and
  between slices: :func:`collective_traffic`, :class:`CollectiveTraffic`
"""

__version__ = "0.1.0"

from gfn_jax.logprobs import PolicySpec
from gfn_jax.models import (
    Model,
    ModelConfig,
    forward,
    init_params,
    load,
    load_gguf,
    load_hf,
    param_axes,
    save_hf,
)
from gfn_jax.models.adapters import Adapters
from gfn_jax.models.lora import LoraConfig, init_lora, merge_lora
from gfn_jax.objectives import (
    db_loss,
    init_log_z,
    apply_log_z,
    ppo_loss,
    reinforce_loss,
    sft_loss,
    subtb_loss,
    tb_loss,
)
from gfn_jax.parallel import MeshConfig, make_mesh, to_host
from gfn_jax.replay import ReplayBuffer
from gfn_jax.sampling import DecodeWeights, SampleOutput, cache_decode_weights, sample
from gfn_jax.scoring import score_policy, score_reward_prefixes, score_suffix_prefixes
from gfn_jax.checkpoint import Checkpointer, CheckpointError
from gfn_jax.tasks import Target, Task, make_task, register_task
from gfn_jax.batch import TrainBatch
from gfn_jax.objective_registry import (
    LossInputs,
    Needs,
    Objective,
    get_objective,
    objective_names,
    register_objective,
)
from gfn_jax.policy import Policy, load_policy, load_run
from gfn_jax.step import StepSpec, TrainState, make_prepare, make_train_step
from gfn_jax.train import Trainer, plan_run
from gfn_jax.memory import (
    DoesNotFitError,
    MemoryEstimate,
    MemoryPlan,
    estimate_sampler_memory,
    estimate_step_memory,
)
from gfn_jax.targets import TargetError, TpuTarget, parse_target
from gfn_jax.comms import CollectiveTraffic, collective_traffic
from gfn_jax.decoding import (
    DecodeOutput,
    beam_search,
    diverse_beam_search,
    greedy,
    sample_nucleus,
    sample_pure,
    sample_tempered,
)
from gfn_jax.text_metrics import bleu4, distinct_n, embedding_diversity, gleu, load_sentence_encoder
from gfn_jax.data import ShardedStream, open_source
from gfn_jax.tasks.calculator import CalculatorTool, evaluate_expression
from gfn_jax.compile_cache import enable_compilation_cache
from gfn_jax.hostmem import keep_freed_memory
from gfn_jax.collective_order import unordered_collectives
from gfn_jax.profiling import StepProfiler, kernel_spans, summarize as summarize_kernels

__all__ = [
    "PolicySpec", "Model", "ModelConfig", "forward", "init_params", "load", "load_gguf",
    "load_hf", "param_axes", "save_hf", "LoraConfig", "init_lora", "merge_lora", "db_loss",
    "init_log_z", "apply_log_z", "ppo_loss", "reinforce_loss", "sft_loss", "subtb_loss",
    "tb_loss", "MeshConfig", "make_mesh", "ReplayBuffer", "SampleOutput", "sample",
    "DecodeWeights", "cache_decode_weights",
    "score_policy", "score_reward_prefixes", "score_suffix_prefixes", "Checkpointer",
    "CheckpointError", "Task", "Target", "make_task", "register_task", "Trainer", "TrainState",
    "Adapters", "TrainBatch", "LossInputs", "Needs", "Objective", "get_objective",
    "objective_names", "register_objective", "Policy", "load_policy", "load_run", "StepSpec",
    "make_prepare", "make_train_step", "DecodeOutput", "beam_search", "diverse_beam_search",
    "greedy", "sample_nucleus", "sample_pure", "sample_tempered", "bleu4", "distinct_n",
    "embedding_diversity", "gleu", "load_sentence_encoder", "ShardedStream", "open_source",
    "CalculatorTool", "evaluate_expression", "enable_compilation_cache",
    "keep_freed_memory",
    "unordered_collectives", "to_host", "StepProfiler", "kernel_spans", "summarize_kernels",
    "plan_run", "DoesNotFitError", "MemoryEstimate", "MemoryPlan", "estimate_sampler_memory",
    "estimate_step_memory", "parse_target", "TpuTarget", "TargetError",
    "CollectiveTraffic", "collective_traffic",
]
