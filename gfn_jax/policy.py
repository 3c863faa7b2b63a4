"""The policy as a value: load it from a run directory, sample from it, score with it.

A :class:`Policy` bundles what defines q(Z | X): the model config, the base parameters and
LoRA adapters (or fine-tuned parameters), the task's policy spec (termination set, min/max
length), its logit bias and tool, and the tokenizer. It needs no optimizer state, replay
buffer or mesh, so ``gfn-jax sample / eval / convert`` and library users load one cheaply::

    policy = gfn_jax.load_policy("runs/rng")
    samples = policy.sample(["Pick a number:"], n=16)
    logq = policy.log_prob(["Pick a number:"] * 2, [" 17", " 4"])
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import jax
import jax.numpy as jnp
import numpy as np

from gfn_jax.logprobs import PolicySpec
from gfn_jax.models import lora as lora_lib
from gfn_jax.models import registry
from gfn_jax.models.adapters import Adapters
from gfn_jax.models.config import ModelConfig
from gfn_jax.models.tokenizer import Tokenizer
from gfn_jax.models.transformer import activation_sharding, default_feature_major, init_params
from gfn_jax.sampling import DecodeWeights, SampleOutput, cache_decode_weights
from gfn_jax.sampling import sample as sample_fn
from gfn_jax.scoring import score_policy

Params = Any

__all__ = ["Policy", "load_policy", "load_run", "load_base_model", "load_model_config",
           "load_base_params", "run_config", "left_pad"]


#: Fewest decoder calls for which :meth:`Policy.for_decoding` lays the weights out once: the
#: copy's program compiles once (~2 s for SmolLM2-135M on 2 cores, then cached) and each
#: call saves ~0.1 s (``docs/performance.md``).
MIN_CALLS_TO_KEEP = 4


def keeps_decode_weights(model_cfg: ModelConfig, calls: int, rows: int) -> bool:
    """Whether a loop of ``calls`` decoder calls of ``rows`` rows lays the weights out once
    (:meth:`Policy.for_decoding`'s rule)."""
    return (calls >= MIN_CALLS_TO_KEEP and model_cfg.decode_layers == "unrolled"
            and default_feature_major(rows))


def run_keeps_decode_weights(config: Any, model_cfg: ModelConfig) -> bool:
    """Whether a training run keeps its LoRA base laid out for the sampler: LoRA (the base
    never changes), ``model.cache_decode_weights``, and :func:`keeps_decode_weights` for
    ``train.steps`` draws of ``train.prompts_per_batch x train.samples_per_prompt`` rows
    (the Trainer's rule; the memory planner counts the copy by it)."""
    t = config.train
    return (bool(config.lora.enabled) and bool(config.model.get("cache_decode_weights", True))
            and keeps_decode_weights(model_cfg, int(t.steps),
                                     int(t.prompts_per_batch) * int(t.samples_per_prompt)))


@dataclasses.dataclass
class Policy:
    """q(Z | X): a model, its adapters and the task's constraints.

    Attributes:
      model_config: architecture.
      params: base parameters (LoRA) or the fine-tuned parameters (full fine-tuning).
      adapters: LoRA :class:`~gfn_jax.models.adapters.Adapters`, or None.
      spec: termination ids and min/max length of Z.
      tokenizer: the tokenizer of prompts and samples.
      logit_bias: additive [V] bias that is part of q (e.g. forbidden tokens), or None.
      tool: the task's sampler tool (spliced tokens are not actions), or None.
      encode_prompt: how prompts become token ids (the task's encoding; default: the
        tokenizer's ``encode``).
      decode_weights: ``params`` laid out once for the sampler's decode loop
        (:func:`~gfn_jax.sampling.cache_decode_weights`), or None (laid out per call); used
        only while made from these very ``params``.
      shard: ``(mesh, rules)`` the sampler splits each draw's rows over (the mesh's batch
        axes; :func:`~gfn_jax.models.transformer.activation_sharding`), so that a row is
        sampled on one device instead of on every device the weights are replicated over;
        None: no constraint (the trainer's policies carry its mesh).
    """

    model_config: ModelConfig
    params: Params
    adapters: Optional[Adapters]
    spec: PolicySpec
    tokenizer: Tokenizer
    logit_bias: Optional[jax.Array] = None
    tool: Any = None
    encode_prompt: Optional[Callable[[str], List[int]]] = None
    decode_weights: Optional[DecodeWeights] = None
    shard: Optional[Tuple[Any, Any]] = None

    # ------------------------------------------------------------------ prompts
    @property
    def pad_id(self) -> int:
        return int(self.tokenizer.pad_id or 0)

    @property
    def max_prompt_len(self) -> int:
        """The longest prompt that fits the context together with ``spec.max_len`` tokens."""
        return int(self.model_config.max_seq_len) - int(self.spec.max_len)

    def encode(self, prompts: Sequence[str]) -> List[List[int]]:
        """Token ids of each prompt; a clear error for an empty or too long prompt."""
        enc = self.encode_prompt or self.tokenizer.encode
        out = []
        for k, p in enumerate(prompts):
            ids = list(enc(p))
            if not ids:
                raise ValueError(f"prompt {k} ({p[:60]!r}) encodes to no tokens")
            if len(ids) > self.max_prompt_len:
                raise ValueError(
                    f"prompt {k} has {len(ids)} tokens; with up to {self.spec.max_len} generated "
                    f"tokens the model's context of {self.model_config.max_seq_len} allows "
                    f"prompts of at most {self.max_prompt_len} tokens: {p[:60]!r}")
            out.append(ids)
        return out

    def pad(self, ids: Sequence[Sequence[int]], length: Optional[int] = None
            ) -> Tuple[np.ndarray, np.ndarray]:
        """Left-pad token lists to ``length`` (default: the longest); (tokens, mask) int32."""
        return left_pad(ids, int(length or max(len(x) for x in ids)), self.pad_id)

    # ------------------------------------------------------------------ sampling
    def for_decoding(self, calls: int, rows: int) -> "Policy":
        """This policy, or a copy carrying its weights laid out for decoding once
        (:func:`~gfn_jax.sampling.cache_decode_weights`) when it is about to make at least
        :data:`MIN_CALLS_TO_KEEP` decoder calls of ``rows`` rows that would each lay them out
        themselves (on CPU, at most
        :data:`~gfn_jax.models.transformer.FEATURE_MAJOR_MAX_ROWS` rows) and it carries none
        yet. Never with ``decode_layers="scanned"``, whose decoders copy no weight."""
        if self.decode_weights is None and keeps_decode_weights(self.model_config, calls, rows):
            return dataclasses.replace(self, decode_weights=cache_decode_weights(self.params))
        return self

    def draw(self, prompt_tokens: Any, prompt_mask: Any, rng: jax.Array, num_samples: int,
             *, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
             epsilon: float = 0.0) -> SampleOutput:
        """The jitted sampler on padded prompts (see :func:`gfn_jax.sampling.sample`)."""
        with activation_sharding(*self.shard) if self.shard else contextlib.nullcontext():
            return sample_fn(
                self.model_config, self.params, rng, jnp.asarray(prompt_tokens),
                jnp.asarray(prompt_mask), self.spec, num_samples=num_samples,
                temperature=temperature, top_k=top_k, top_p=top_p, epsilon=epsilon,
                logit_bias=self.logit_bias, adapters=self.adapters, tool=self.tool,
                pad_id=self.pad_id, decode_weights=self.decode_weights)

    def sample(self, prompts: Sequence[str], n: int, *, temperature: float = 1.0,
               top_k: int = 0, top_p: float = 1.0, seed: int = 0, batch_size: int = 0,
               progress: bool = False, desc: str = "sampling") -> List[Dict[str, Any]]:
        """``n`` samples of each prompt, as dicts ``{prompt, text, tokens, log_q}`` (prompt
        order, then sample order); ``log_q`` is log q(Z ⊤ | X) under the untempered policy.
        ``batch_size`` bounds the samples per sampler call (default ``n``)."""
        if int(n) < 1:
            raise ValueError(f"the number of samples must be >= 1, got {n}")
        bs = int(batch_size) or int(n)
        ids = self.encode(prompts)
        pol = self.for_decoding(len(prompts) * -(-int(n) // bs), min(bs, int(n)))
        out: List[Dict[str, Any]] = []
        key = jax.random.PRNGKey(seed)
        bar = _bar(len(prompts) * n, desc, progress)
        try:
            for p, pid in zip(prompts, ids):
                toks, mask = self.pad([pid])
                left = int(n)
                while left > 0:
                    k = min(bs, left)
                    key, sub = jax.random.split(key)
                    out += self._records([p], pol.draw(toks, mask, sub, k,
                                                       temperature=temperature, top_k=top_k,
                                                       top_p=top_p))
                    left -= k
                    bar.update(k)
        finally:
            bar.close()
        return out

    def sample_total(self, prompts: Sequence[str], num: int, *, batch_size: int,
                     temperature: float = 1.0, seed: int = 0, progress: bool = False,
                     desc: str = "sampling") -> List[Dict[str, Any]]:
        """``num`` samples in all, ``batch_size`` of each prompt in turn (cycling)."""
        if int(num) < 1:
            raise ValueError(f"the number of samples must be >= 1, got {num}")
        if int(batch_size) < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        ids = self.encode(prompts)
        pol = self.for_decoding(-(-int(num) // int(batch_size)), min(int(batch_size), int(num)))
        out: List[Dict[str, Any]] = []
        key = jax.random.PRNGKey(seed)
        bar = _bar(num, desc, progress and num >= 2 * batch_size)
        c = 0
        try:
            while len(out) < num:
                key, sub = jax.random.split(key)
                pi = c % len(ids)
                k = min(int(batch_size), num - len(out))
                toks, mask = self.pad([ids[pi]])
                out += self._records([prompts[pi]], pol.draw(toks, mask, sub, k,
                                                             temperature=temperature))
                bar.update(k)
                c += 1
        finally:
            bar.close()
        return out

    def _records(self, prompts: Sequence[str], s: SampleOutput) -> List[Dict[str, Any]]:
        s = jax.device_get(s)
        k = len(s.lengths) // len(prompts)
        lq = _seq_logq(np.asarray(s.log_pf), np.asarray(s.log_pterm), np.asarray(s.lengths))
        recs = []
        for r in range(len(s.lengths)):
            n = int(s.lengths[r])
            toks = np.asarray(s.tokens[r, :n]).tolist()
            recs.append({"prompt": prompts[r // k], "text": self.tokenizer.decode(toks),
                         "tokens": toks, "log_q": float(lq[r])})
        return recs

    # ------------------------------------------------------------------ scoring
    def log_prob(self, prompts: Sequence[str],
                 continuations: Sequence[Union[str, Sequence[int]]],
                 action_masks: Optional[Sequence[Sequence[bool]]] = None) -> np.ndarray:
        """log q(Z ⊤ | X) of each (prompt, continuation) pair, [N] float.

        Continuations are strings (encoded without BOS) or token-id lists, without the
        termination token. ``action_masks`` marks policy actions (False: tool-spliced tokens,
        which carry no log-prob). A continuation the policy cannot produce (too long, a
        forbidden token, too short) gets a very negative value (about -1e30)."""
        if len(prompts) != len(continuations):
            raise ValueError(f"{len(prompts)} prompts but {len(continuations)} continuations")
        ids = self.encode(prompts)
        toks, mask = self.pad(ids)
        zs = [list(self.tokenizer.encode(c, add_bos=False)) if isinstance(c, str) else list(c)
              for c in continuations]
        T = self.spec.max_len
        too_long = [k for k, z in enumerate(zs) if len(z) > T]
        if too_long:
            raise ValueError(f"continuation {too_long[0]} has {len(zs[too_long[0]])} tokens, "
                             f"more than the policy's max_len={T}")
        z = np.full((len(zs), T), self.pad_id, np.int32)
        am = np.ones((len(zs), T), bool)
        for k, seq in enumerate(zs):
            z[k, :len(seq)] = seq
            if action_masks is not None:
                am[k, :len(seq)] = np.asarray(action_masks[k], bool)[:len(seq)]
        lengths = np.asarray([len(s) for s in zs], np.int32)
        sc = score_policy(self.model_config, self.params, toks, mask, z, lengths, self.spec,
                          logit_bias=self.logit_bias, adapters=self.adapters, action_mask=am)
        return _seq_logq(np.asarray(sc.log_pf), np.asarray(sc.log_pterm), lengths)

    # ------------------------------------------------------------------ export
    def merged_params(self) -> Params:
        """Parameters with the LoRA adapters folded in (the base ones without adapters)."""
        if self.adapters is None:
            return self.params
        return lora_lib.merge_lora(self.params, self.adapters.to_dict())

    def save_hf(self, out_dir: str) -> None:
        """Export the merged policy as a Hugging Face directory."""
        from gfn_jax.models import hf

        hf.save_hf(self.model_config, self.merged_params(), out_dir, tokenizer=self.tokenizer)


def left_pad(ids: Sequence[Sequence[int]], length: int, pad_id: int
             ) -> Tuple[np.ndarray, np.ndarray]:
    """Token lists left-padded to ``length``: (tokens, mask) int32 ``[N, length]``, mask 1 on
    the real tokens; a list longer than ``length`` is an error."""
    toks = np.full((len(ids), length), pad_id, np.int32)
    mask = np.zeros((len(ids), length), np.int32)
    for r, seq in enumerate(ids):
        if len(seq) > length:
            raise ValueError(f"prompt {r} has {len(seq)} tokens, more than the padded "
                             f"length {length}")
        toks[r, length - len(seq):] = seq
        mask[r, length - len(seq):] = 1
    return toks, mask


def _seq_logq(log_pf: np.ndarray, log_pterm: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    n = lengths.astype(np.int64)
    T = log_pf.shape[1]
    steps = np.where(np.arange(T)[None, :] < n[:, None], log_pf, 0.0).sum(1)
    return steps + log_pterm[np.arange(len(n)), n]


def _bar(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="seq", dynamic_ncols=True,
                disable=not enabled or jax.process_index() != 0)


# ---------------------------------------------------------------------------- loading
def _run_options(m: Any) -> Dict[str, Any]:
    """The ``ModelConfig`` fields a run's ``config.model`` sets on top of the architecture
    (keys that older run configs lack take their defaults)."""
    return dict(remat=bool(m.remat), remat_policy=m.get("remat_policy", ""),
                logits_chunk=int(m.get("logits_chunk", 0)),
                share_prompt=bool(m.get("share_prompt", True)),
                decode_chunk=int(m.get("decode_chunk", 1)),
                decode_layers=str(m.get("decode_layers", "unrolled")),
                decode_gather_weights=bool(m.get("decode_gather_weights", False)))


def _for_run(cfg: ModelConfig, m: Any) -> ModelConfig:
    """A loaded model's config with the run's compute dtype and options (``config.model``)."""
    return cfg.replace(dtype=m.dtype, **_run_options(m))


def load_model_config(config: Any, task: Any) -> Tuple[ModelConfig, Tokenizer]:
    """The run's model config and tokenizer, without any weight: ``spec='random'`` from
    ``config.model.random`` with the task's tokenizer; an HF directory or GGUF file from its
    config and tokenizer (:func:`gfn_jax.models.registry.load_config`)."""
    m = config.model
    if m.spec == "random":
        tok = task.build_tokenizer()
        kw = dict(m.random.to_dict())
        if tok is not None and not kw.get("vocab_size"):
            kw["vocab_size"] = tok.vocab_size
        return ModelConfig(dtype=m.dtype, param_dtype=m.param_dtype, **_run_options(m),
                           **kw), tok
    cfg, tok = registry.load_config(m.spec, dtype=m.param_dtype)
    return _for_run(cfg, m), _tokenizer_or_task(config, task, tok)


def _tokenizer_or_task(config: Any, task: Any, tok: Optional[Tokenizer]) -> Tokenizer:
    tok = tok or task.build_tokenizer()
    if tok is None:
        raise ValueError(f"model.spec={config.model.spec!r} has no tokenizer and task "
                         f"{config.task.name!r} supplies none")
    return tok


def load_base_params(config: Any, model_cfg: ModelConfig, host: bool = False,
                     shardings: Optional[Callable[[ModelConfig], Any]] = None) -> Params:
    """The weights of :func:`load_model_config`'s model: a random model drawn (in
    ``shardings(model_cfg)`` when given: each device draws only its shards), a loaded one
    read (``host``: kept numpy arrays in host memory, for placing with their shardings)."""
    m = config.model
    if m.spec == "random":
        return init_params(model_cfg, jax.random.PRNGKey(m.init_seed), std=m.init_std,
                           out_shardings=None if shardings is None else shardings(model_cfg))
    model = registry.load(m.spec, dtype=m.param_dtype, host=host)
    loaded = _for_run(model.config, m)
    if loaded != model_cfg:
        raise ValueError(f"model.spec={m.spec!r}: its weights came with another config "
                         f"({loaded}) than its metadata gave ({model_cfg}); did the files "
                         f"change while the run started?")
    return model.params


def load_base_model(config: Any, task: Any, host: bool = False,
                    shardings: Optional[Callable[[ModelConfig], Any]] = None,
                    ) -> Tuple[ModelConfig, Params, Tokenizer]:
    """The model named by ``config.model``: (config, params, tokenizer). A loaded model is
    read once (config, weights, tokenizer); a random one is :func:`load_model_config` then
    :func:`load_base_params`."""
    m = config.model
    if m.spec != "random":  # one read of a loaded model: config, weights and tokenizer
        model = registry.load(m.spec, dtype=m.param_dtype, host=host)
        return (_for_run(model.config, m), model.params,
                _tokenizer_or_task(config, task, model.tokenizer))
    cfg, tok = load_model_config(config, task)
    return cfg, load_base_params(config, cfg, host=host, shardings=shardings), tok


def run_config(workdir: str) -> Any:
    """The config a run was trained with (its ``config.json`` over the defaults)."""
    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{workdir!r} is not a gfn-jax run directory (no config.json); "
                                "run `gfn-jax train` first")
    try:
        with open(path) as f:
            d = json.load(f)
    except ValueError as e:
        raise ValueError(f"{path}: not valid JSON ({e}); the run directory is damaged") from None
    from gfn_jax.defaults import config_from_dict

    return config_from_dict(d)


def _abstract_trainable(config: Any, model_cfg: ModelConfig, base: Params) -> Any:
    if config.lora.enabled:
        lcfg = lora_config(config)
        return jax.eval_shape(lambda: lora_lib.init_lora(model_cfg, base, lcfg,
                                                         jax.random.PRNGKey(0))["tree"])
    return jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype), base)


def lora_config(config: Any) -> lora_lib.LoraConfig:
    """The :class:`~gfn_jax.models.lora.LoraConfig` of a run config."""
    lc = config.lora
    return lora_lib.LoraConfig(rank=lc.rank, alpha=lc.alpha, dropout=lc.dropout,
                               targets=tuple(lc.targets))


def load_run(workdir: str, step: Optional[int] = None,
             require_checkpoint: bool = True) -> Tuple[Any, Any, Policy, Params]:
    """(config, task, policy, reward params) of a run directory, without optimizer state.

    The reward parameters are those of ``reward.model`` when the run names one, else the
    base model's (adapters off) under LoRA, or the initial weights under full fine-tuning
    (for tasks that score samples with the reward model)."""
    from gfn_jax.checkpoint import Checkpointer
    from gfn_jax.tasks import make_task

    config = run_config(workdir)
    task = make_task(config.task, config.data.get("root", ""))
    model_cfg, base, tok = load_base_model(config, task)
    task.setup(model_cfg, tok)
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"))
    trainable = None
    if ckpt.latest_step() is not None or require_checkpoint:
        abstract = {"trainable": _abstract_trainable(config, model_cfg, base)}
        sub, _ = restore_policy_subset(ckpt, abstract, step)
        trainable = sub["trainable"]
    if config.lora.enabled:
        if trainable is None:
            trainable = lora_lib.init_lora(model_cfg, base, lora_config(config),
                                           jax.random.PRNGKey(0))["tree"]
        params, adapters = base, Adapters(tree=trainable,
                                          scale=jnp.float32(lora_config(config).scale))
    else:
        params, adapters = (base if trainable is None else trainable), None
    policy = policy_from_task(task, model_cfg, params, adapters, tok)
    if config.reward.get("model", ""):  # the run's reward model is a separate checkpoint
        base = registry.load(config.reward.model, dtype=config.model.param_dtype).params
    return config, task, policy, base


def restore_policy_subset(ckpt: Any, abstract: Dict[str, Any], step: Optional[int]
                          ) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    """Restore only the entries of ``abstract`` (e.g. ``trainable``) of a saved TrainState."""
    return ckpt.restore_subset(step=step, abstract_subset=abstract)


def policy_from_task(task: Any, model_cfg: ModelConfig, params: Params,
                     adapters: Optional[Adapters], tokenizer: Tokenizer) -> Policy:
    """A :class:`Policy` with the task's spec, bias, tool and prompt encoding."""
    bias = task.policy_logit_bias()
    return Policy(model_config=model_cfg, params=params, adapters=adapters,
                  spec=task.policy_spec(), tokenizer=tokenizer,
                  logit_bias=None if bias is None else jnp.asarray(bias, jnp.float32),
                  tool=task.tool(), encode_prompt=task.encode_prompt)


def load_policy(workdir: str, step: Optional[int] = None) -> Policy:
    """The trained policy of a run directory (latest checkpoint, or ``step``)."""
    return load_run(workdir, step)[2]
