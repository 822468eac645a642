"""Runs catalogue attacks on a model and dataset: DEEPSEC candidates, padded batches, resumable.

:func:`run_attack` runs one attack and writes into its workdir:

- ``adversarial.npz``: ``indices`` (into the dataset split, in DEEPSEC's draw order), ``x``,
  ``x_adv``, ``y`` (true labels), ``target`` (targeted attacks), ``success``, ``predicted``,
  ``iterations``, ``l0``, ``l2``, ``linf``, and ``queries`` (query-based attacks);
- ``results.json`` and ``results.md``: the settings and the metrics;
- while running: ``run_config.json`` (what is being run), ``partial/`` (one file per finished
  batch, written atomically) and ``claims/`` (the batches being attacked). Rerunning with the
  same workdir continues with the unfinished batches; a finished run is returned as is.
  Several processes started with the same config on one workdir share its batches (see
  ``advtrace._src.work_pool``), e.g. one per CPU core for a slow attack; the batch of a
  process that dies goes back to the others.

:func:`reproduce_attacks` runs a list of attacks (default: seed-003's 18 with Table VII) on one
model, each in ``<workdir>/<attack>/``, and writes a summary table beside seed-003 Table I.

Candidates (DEEPSEC ``CleanDatasets/CandidatesSelection.py``): the correctly classified examples
of the split, in dataset order, sampled with Python's ``random.Random(seed).sample`` (seed 100,
as ``advtrace.data.select_candidates``); then, from the *same* generator, one random target
``!= label`` per candidate, in draw order (``random.sample(classes - {label}, 1)``), exactly as
DEEPSEC does right after sampling. The least-likely target is the argmin of the clean logits. A
pool of ``candidate_pool`` candidates (DEEPSEC: 1000) is drawn and the first ``n_examples`` are
attacked, so runs with fewer examples attack a prefix of DEEPSEC's candidate list with DEEPSEC's
targets. Our tfds record order differs from torchvision's, so the images differ from DEEPSEC's.

Randomness: example ``i`` (its position in the candidate list) gets the key
``fold_in(key(seed), i)``, whatever the batch size, so results do not depend on batching.

References:
  Ling et al., "DEEPSEC: A Uniform Platform for Security Analysis of Deep Learning Model",
  IEEE S&P 2019. https://github.com/ryderling/DEEPSEC
"""

from __future__ import annotations

import collections
import json
import os
import random
import time
from collections.abc import Callable
from collections.abc import Mapping
from collections.abc import Sequence
from typing import Any
from typing import NamedTuple

import jax
import ml_collections
import numpy as np
from absl import logging

from advtrace._src import atomic
from advtrace._src import batching
from advtrace._src import checks
from advtrace._src import data
from advtrace._src import weights as weights_lib
from advtrace._src import work_pool
from advtrace._src import xla
from advtrace._src.attacks import catalog
from advtrace._src.attacks import settings as settings_lib
from advtrace._src.attacks import uap as uap_lib
from advtrace._src.models import deepsec_weights
from advtrace._src.models import registry

_RESERVED = ("logits_fn", "x", "labels", "key", "targeted", "loop_mode")
_RUN_CONFIG = "run_config.json"
_UAP_FILE = "uap_perturbation.npz"
_UAP_PROGRESS = "uap_progress.npz"
_INFO_FIELDS = ("success", "predicted", "iterations", "queries", "l0", "l2", "linf")

# seed-003 Table I (attractors.md §3): attack success rate (%) on the undefended classifier C,
# column (c) for MNIST and (h) for CIFAR-10. Measured by the paper on the whole test set.
PAPER_TABLE1_ASR: Mapping[str, Mapping[str, float]] = {
    "mnist": {
        "fgsm": 90.4, "rfgsm": 65.6, "bim": 100.0, "pgd": 100.0, "umifgsm": 100.0,
        "uap": 24.2, "deepfool": 100.0, "om": 100.0, "bpda": 100.0, "spsa": 96.8,
        "llc": 7.7, "rllc": 1.6, "illc": 77.5, "tmifgsm": 91.6, "jsma": 74.1, "blb": 100.0,
        "cw2": 100.0, "ead": 98.9},
    "cifar10": {
        "fgsm": 88.7, "rfgsm": 99.6, "bim": 100.0, "pgd": 100.0, "umifgsm": 100.0,
        "uap": 93.1, "deepfool": 100.0, "om": 100.0, "bpda": 100.0, "spsa": 90.2,
        "llc": 13.2, "rllc": 27.6, "illc": 100.0, "tmifgsm": 100.0, "jsma": 100.0,
        "blb": 100.0, "cw2": 100.0, "ead": 100.0},
}
GAP_THRESHOLD = 10.0  # percentage points; larger |ours - paper| gaps are flagged


# ----------------------------------------------------------------------------- configs


def default_config() -> ml_collections.ConfigDict:
  """The config schema of :func:`run_attack`, with defaults (FGSM on the DEEPSEC MNIST CNN).

  Returns:
    A ConfigDict with fields:
      attack: a catalogue name (``advtrace._src.attacks.catalog.names()``).
      settings: a settings table (``settings.table_names()``), or ``'none'`` for defaults.
      attack_kwargs: a JSON object of keyword arguments that override or extend the table's,
        e.g. ``'{"eps": 0.2}'``; empty for none.
      model: a registered model name; empty to take it from the weights.
      model_kwargs: a JSON object of extra model fields, e.g. ``'{"shift_by_max": false}'``
        for the DEEPSEC models' raw logits; part of the model's name in the results.
      weights: a DEEPSEC ``.pt`` file or an ``advtrace.training`` checkpoint (required).
      dataset, split, data_dir: as for ``advtrace.data.load``.
      n_examples: how many candidates to attack (the first of the pool, in draw order).
      candidate_pool, candidate_seed: DEEPSEC's candidate draw (1000 examples, seed 100).
      seed: the attack PRNG seed.
      batch_size: examples per attack call (the last batch is padded, so nothing retraces).
      eval_batch_size: batch size of the clean forward pass over the split.
      loop_mode: ``'auto'``, ``'host'`` or ``'fused'`` for iterative attacks.
      uap_train_fraction, uap_split_seed: UAP computes its perturbation on this fraction of
        the training split (DEEPSEC: 10%, shuffled with seed 100; the other 90% is its
        validation set for the fooling rate).
  """
  config = ml_collections.ConfigDict()
  config.attack = "fgsm"
  config.settings = "table7_mnist"
  config.attack_kwargs = ""
  config.model = "deepsec_mnist"
  config.model_kwargs = ""
  config.weights = "../shared/weights/deepsec/MNIST_raw.pt"
  config.dataset = "mnist"
  config.split = "test"
  config.data_dir = ml_collections.config_dict.placeholder(str)
  config.n_examples = 1000
  config.candidate_pool = 1000
  config.candidate_seed = 100
  config.seed = 0
  config.batch_size = 100
  config.eval_batch_size = 500
  config.loop_mode = "auto"
  config.uap_train_fraction = 0.1
  config.uap_split_seed = 100
  return config


def default_reproduce_config() -> ml_collections.ConfigDict:
  """The config schema of :func:`reproduce_attacks`: :func:`default_config` plus

  attacks: the catalogue names to run, in order (default: seed-003's 18).
  attack_kwargs: as in :func:`default_config`, applied to every attack.
  n_examples: a ConfigDict ``{attack: count}``; attacks not listed use ``default_n_examples``.
  batch_sizes: a ConfigDict ``{attack: batch size or None}``; None (the default) uses
    ``batch_size``. E.g. ``--config.batch_sizes.om=1``: on a CPU one OptMargin example is
    already 20 model inputs, and a larger batch only adds finished examples to each step.
  fallback_settings: a table for attacks the main table lacks (e.g. BPDA/SPSA under
    ``deepsec_code_*``: ``'table8'``); empty for none.
  paper_column: ``'mnist'`` or ``'cifar10'`` (seed-003 Table I column c or h), or empty.
  continue_on_error: record a failing or unavailable attack and go on, instead of stopping.
  """
  config = default_config()
  del config["attack"]
  del config["n_examples"]  # An int there; a per-attack ConfigDict here.
  config.attacks = catalog.DEEPSEC_ATTACKS
  config.default_n_examples = 1000
  config.n_examples = ml_collections.ConfigDict({name: 1000 for name in catalog.DEEPSEC_ATTACKS})
  config.batch_sizes = ml_collections.ConfigDict(
      {name: ml_collections.config_dict.placeholder(int) for name in catalog.DEEPSEC_ATTACKS})
  config.fallback_settings = ""
  config.paper_column = "mnist"
  config.continue_on_error = False
  return config


def _parse_kwargs(text: str, what: str = "attack_kwargs") -> dict[str, Any]:
  if not text or not text.strip():
    return {}
  try:
    value = json.loads(text)
  except json.JSONDecodeError as e:
    raise ValueError(f"{what} must be a JSON object such as '{{\"eps\": 0.2}}', got "
                     f"{text!r} ({e}).") from e
  if not isinstance(value, dict):
    raise ValueError(f"{what} must be a JSON object, got {text!r}.")
  return value


def resolve_attack(name: str, table: str, overrides: Mapping[str, Any] | str = "",
                   fallback_table: str = "") -> tuple[catalog.AttackSpec, dict[str, Any]]:
  """The catalogue entry and the final keyword arguments for one attack, validated.

  Args:
    name: a catalogue name.
    table: a settings table name.
    overrides: keyword arguments (or their JSON) that replace or extend the table's.
    fallback_table: a table to use when ``table`` has no entry for ``name``.

  Returns:
    ``(spec, kwargs)``.

  Raises:
    ValueError: unknown attack or table, no entry, or keyword arguments the attack (and its
      ``prepare`` step) does not accept.
    catalog.AttackNotAvailableError: the attack's implementation does not exist yet.
  """
  spec = catalog.get(name)
  settings_lib.get_table(table)  # Unknown-table errors before anything else.
  try:
    kwargs = settings_lib.get_settings(table, name)
  except ValueError:
    if not fallback_table:
      raise
    kwargs = settings_lib.get_settings(fallback_table, name)
  kwargs.update(_parse_kwargs(overrides) if isinstance(overrides, str) else dict(overrides))
  reserved = sorted(set(kwargs) & set(_RESERVED))
  if reserved:
    raise ValueError(f"{name}: {reserved} are set by the runner, not by settings or overrides.")
  fixed = sorted(set(kwargs) & {k for k, _ in spec.fixed_kwargs})
  if fixed:
    raise ValueError(f"{name}: {fixed} are fixed by the catalogue entry "
                     f"({dict(spec.fixed_kwargs)}); pick another catalogue name instead.")
  accepted = _accepted_union(spec)
  if accepted is not None:
    unknown = sorted(set(kwargs) - accepted)
    if unknown:
      raise ValueError(f"{name} does not accept {unknown}. Accepted keyword arguments: "
                       f"{', '.join(sorted(accepted - set(_RESERVED)))}.")
  return spec, kwargs


def _accepted_union(spec: catalog.AttackSpec) -> set[str] | None:
  fns = [spec.fn] + ([spec.prepare_fn] if spec.prepare is not None else [])
  sets = [catalog.accepted_kwargs(fn) for fn in fns]
  if any(s is None for s in sets):
    return None
  return set().union(*sets)


def _split_kwargs(fn: Callable[..., Any], kwargs: Mapping[str, Any]) -> dict[str, Any]:
  accepted = catalog.accepted_kwargs(fn)
  return dict(kwargs) if accepted is None else {k: v for k, v in kwargs.items() if k in accepted}


# ----------------------------------------------------------------------------- candidates


def deepsec_candidates(logits: np.ndarray, labels: np.ndarray, number: int,
                       seed: int = 100) -> tuple[np.ndarray, np.ndarray]:
  """DEEPSEC's candidates and random targets, from the clean logits of a whole split.

  The indices equal ``advtrace.data.select_candidates`` with the same seed; the targets come
  from the same generator, drawn right after the candidates, as in DEEPSEC.

  Args:
    logits: clean logits, shape ``(N, K)``.
    labels: true labels, shape ``(N,)``.
    number: how many candidates to draw.
    seed: Python ``random`` seed (DEEPSEC: 100).

  Returns:
    ``(indices, random_targets)``: int64 indices in draw order and int32 targets
    (``!= labels[indices]``).

  Raises:
    ValueError: if fewer than ``number`` examples are classified correctly.
  """
  checks.check_positive(number, "number", allow_zero=False)
  num_classes = logits.shape[-1]
  correct = np.flatnonzero(np.argmax(logits, axis=-1) == labels)
  if number > len(correct):
    raise ValueError(f"Asked for {number} candidates but only {len(correct)} of {len(labels)} "
                     "examples are classified correctly; lower n_examples / candidate_pool.")
  rng = random.Random(seed)
  indices = rng.sample(correct.tolist(), number)
  targets = []
  for i in indices:
    classes = [c for c in range(num_classes) if c != labels[i]]
    targets.append(rng.sample(classes, 1)[0])
  return np.asarray(indices, np.int64), np.asarray(targets, np.int32)


# ----------------------------------------------------------------------------- context


class Context(NamedTuple):
  """A loaded model and dataset split with its clean logits (shared by several attacks)."""
  model: str
  weights: str
  weights_id: str  # sha256 of a .pt file, else the path as given
  logits_fn: Callable[[jax.Array], jax.Array]
  dataset: data.Dataset
  clean_logits: np.ndarray  # of the model that picks the candidates (correctly classified)
  load_time_s: float
  # Logits of the attacked model on the clean split, for least-likely targets; None: the
  # attacked model is the one that picked the candidates (``clean_logits``).
  target_logits: np.ndarray | None = None


_CONTEXT_CACHE: collections.OrderedDict[tuple, Context] = collections.OrderedDict()
_CONTEXT_CACHE_SIZE = 2


def _stamp(path: str) -> int:
  """The newest modification time under ``path`` (0 if it does not exist)."""
  if not path or not os.path.exists(path):
    return 0
  if os.path.isfile(path):
    return os.stat(path).st_mtime_ns
  return max([os.stat(path).st_mtime_ns] + [
      os.stat(os.path.join(root, f)).st_mtime_ns
      for root, _, files in os.walk(path) for f in files])


def clear_context_cache() -> None:
  """Forgets the models and datasets :func:`load_context` keeps for reuse."""
  _CONTEXT_CACHE.clear()


def load_context(config: ml_collections.ConfigDict) -> Context:
  """Loads the dataset split (first, for a clear error when it is missing) and the model.

  The last two contexts are kept in memory (keyed by the weights, their modification time,
  the model, the dataset and the split), so several attacks in one process share one
  ``logits_fn`` and its compiled functions; :func:`clear_context_cache` drops them.

  Raises:
    advtrace.data.DatasetNotFoundError: the dataset is not available.
    ValueError / FileNotFoundError: missing or unsuitable weights.
  """
  weights = os.path.abspath(config.weights) if config.weights else ""
  key = (weights, _stamp(weights), config.model, config.model_kwargs, str(config.dataset),
         _stamp(str(config.dataset)), config.split, config.data_dir, int(config.eval_batch_size))
  if key in _CONTEXT_CACHE:
    _CONTEXT_CACHE.move_to_end(key)
    return _CONTEXT_CACHE[key]
  context = _load_context(config)
  _CONTEXT_CACHE[key] = context
  while len(_CONTEXT_CACHE) > _CONTEXT_CACHE_SIZE:
    _CONTEXT_CACHE.popitem(last=False)
  return context


def _load_context(config: ml_collections.ConfigDict) -> Context:
  t0 = time.perf_counter()
  ds = data.load(config.dataset, config.split, config.data_dir)
  if not config.weights:
    raise ValueError("config.weights is required: a DEEPSEC .pt file (e.g. "
                     "../shared/weights/deepsec/MNIST_raw.pt) or the workdir of an "
                     "experiments/train.py run.")
  model_name, variables = weights_lib.load_weights(config.weights, config.model or None)
  extra_kwargs = _parse_kwargs(config.model_kwargs, "model_kwargs")
  num_classes, model_kwargs = ds.num_classes, extra_kwargs
  if os.path.isdir(config.weights):
    metadata = weights_lib.checkpoint_metadata(config.weights)
    model_kwargs = {**(metadata.get("model_kwargs") or {}), **extra_kwargs}
    num_classes = int(metadata.get("num_classes", num_classes))
    weights_id = config.weights
  else:
    weights_id = "sha256:" + deepsec_weights.sha256_file(config.weights)
  if num_classes != ds.num_classes:
    raise ValueError(f"{model_name} from {config.weights} has {num_classes} outputs but "
                     f"{ds.name} has {ds.num_classes} classes.")
  net = registry.get_model(model_name, num_classes=num_classes, **model_kwargs)
  weights_lib.check_variables(net, variables, (1, *ds.images.shape[1:]),
                              what=f"weights {config.weights!r}")
  logits_fn = registry.logits_fn(net, jax.device_put(variables))
  clean = batching.map_batched(xla.jit(logits_fn), ds.images, int(config.eval_batch_size))
  logging.info("Loaded %s (%s) and %s/%s (%d examples, clean accuracy %.2f%%) in %.1f s.",
               model_name, config.weights, ds.name, config.split, len(ds.labels),
               100 * np.mean(np.argmax(clean, -1) == ds.labels), time.perf_counter() - t0)
  if extra_kwargs:
    model_name += json.dumps(extra_kwargs, sort_keys=True)
  return Context(model_name, str(config.weights), weights_id, logits_fn, ds, clean,
                 time.perf_counter() - t0)


def _canonical(obj):
  return json.loads(json.dumps(obj, default=atomic.json_default))


# ----------------------------------------------------------------------------- run_attack


@jax.jit
def _example_keys(seed: jax.Array, positions: jax.Array) -> jax.Array:
  return jax.vmap(jax.random.fold_in, (None, 0))(jax.random.key(seed), positions)


def _call_kwargs(fn, spec: catalog.AttackSpec, kwargs: Mapping[str, Any], loop_mode: str):
  call = dict(kwargs)
  accepted = catalog.accepted_kwargs(fn)
  if accepted is None or "targeted" in accepted:
    call["targeted"] = spec.targeted
  elif spec.targeted:
    raise ValueError(f"{spec.name} is a targeted catalogue entry but its function takes no "
                     "'targeted' argument.")
  if accepted is None or "loop_mode" in accepted:
    call["loop_mode"] = loop_mode
  return call


def run_attack(config: ml_collections.ConfigDict, workdir: str | os.PathLike) -> dict[str, Any]:
  """Runs one catalogue attack on DEEPSEC-style candidates and writes the results.

  Resumable: rerunning with the same ``config`` and ``workdir`` continues with the unfinished
  batches (a finished run returns its saved results). Processes running the same config on one
  workdir at the same time share its batches. A different config in a used workdir is an error.

  Args:
    config: see :func:`default_config`.
    workdir: the output folder (created if missing).

  Returns:
    The dict written to ``results.json``: the attack and its settings (``settings_table``,
    ``kwargs``), model, weights, dataset, ``n_examples``, ``attack_success_rate`` (percent;
    targeted attacks: classified as the target), ``misclassification_rate`` (percent,
    prediction != true label), ``mean_{l0,l2,linf}_successful`` (over successful examples,
    None if there are none) and ``mean_{l0,l2,linf}_all`` (over all examples; a failed
    minimal-perturbation attack contributes 0), ``mean_queries`` / ``mean_iterations``,
    ``attack_time_s`` (attack calls only, summed over resumed sessions and processes),
    ``wall_time_s`` (this call), ``first_batch_s`` (this call's first batch, including
    compilation; None if it attacked none), ``examples_per_sec`` (steady state: this call's
    batches after its first), ``device`` and more.
  """
  t0 = time.perf_counter()
  spec, kwargs = resolve_attack(config.attack, config.settings, config.attack_kwargs)
  context = load_context(config)
  return _run(config, workdir, spec, kwargs, context, t0)


def run_resolved(config: ml_collections.ConfigDict, workdir: str | os.PathLike,
                 spec: catalog.AttackSpec, kwargs: Mapping[str, Any],
                 context: Context) -> dict[str, Any]:
  """:func:`run_attack` for an attack already resolved and a model already loaded.

  ``context`` may wrap the loaded model (``context._replace(logits_fn=..., model=...,
  weights_id=...)``), e.g. a defended model attacked on the candidates of the undefended one;
  ``model`` and ``weights_id`` name the attacked model in the workdir's fingerprint, so give a
  wrapped model its own.
  """
  return _run(config, workdir, spec, dict(kwargs), context, time.perf_counter())


def _fingerprint(config, spec, kwargs, context: Context) -> dict[str, Any]:
  fp = {
      "attack": spec.name, "settings_table": config.settings, "kwargs": kwargs,
      "model": context.model, "weights": context.weights_id, "dataset": context.dataset.name,
      "split": config.split, "n_examples": int(config.n_examples),
      "candidate_pool": _pool(config), "candidate_seed": int(config.candidate_seed),
      "seed": int(config.seed),
  }
  if spec.needs_train_set:
    fp.update(uap_train_fraction=float(config.uap_train_fraction),
              uap_split_seed=int(config.uap_split_seed))
  return _canonical(fp)


def _pool(config) -> int:
  return max(int(config.candidate_pool), int(config.n_examples))


def candidates(config: ml_collections.ConfigDict,
               context: Context) -> tuple[np.ndarray, np.ndarray]:
  """The test indices an attack run attacks and their random targets: the first
  ``config.n_examples`` of DEEPSEC's candidates drawn from a pool of ``config.candidate_pool``."""
  n = int(config.n_examples)
  indices, targets = deepsec_candidates(context.clean_logits, context.dataset.labels,
                                        _pool(config), int(config.candidate_seed))
  return indices[:n], targets[:n]


def check_fingerprint(path: str, fingerprint: dict[str, Any], what: str) -> None:
  """Records ``fingerprint`` (JSON) at ``path``, or checks that the one recorded there is equal.

  Raises:
    ValueError: the folder holds ``what`` with other settings (the message names the keys).
  """
  if not os.path.exists(path):
    atomic.write_json(path, fingerprint)
    return
  with open(path) as f:
    saved = json.load(f)
  if saved != fingerprint:
    diff = sorted(k for k in set(saved) | set(fingerprint) if saved.get(k) != fingerprint.get(k))
    raise ValueError(f"{os.path.dirname(path)} holds {what} (differs in {diff}); use a fresh "
                     "workdir, or delete it to start over.")


def is_finished(folder: str) -> bool:
  """Whether ``folder`` holds a finished attack run (its results and adversarial examples)."""
  return all(os.path.exists(os.path.join(folder, f))
             for f in ("results.json", "adversarial.npz"))


def _prepare_workdir(workdir: str, fingerprint: dict[str, Any]) -> dict[str, Any] | None:
  """Checks a reused workdir; returns saved results if this exact run already finished."""
  os.makedirs(workdir, exist_ok=True)
  check_fingerprint(os.path.join(workdir, _RUN_CONFIG), fingerprint, "a different attack run")
  return _saved_results(workdir) if is_finished(workdir) else None


def _targets(spec, context: Context, indices, random_targets, labels) -> np.ndarray:
  if spec.target_rule == "true":
    return labels
  if spec.target_rule == "least_likely":
    logits = context.clean_logits if context.target_logits is None else context.target_logits
    return np.argmin(logits[indices], axis=-1).astype(np.int32)
  return random_targets


def _run(config, workdir, spec: catalog.AttackSpec, kwargs: dict[str, Any], context: Context,
         t0: float) -> dict[str, Any]:
  workdir = os.fspath(workdir)
  checks.check_positive(config.n_examples, "n_examples", allow_zero=False)
  checks.check_positive(config.batch_size, "batch_size", allow_zero=False)
  fingerprint = _fingerprint(config, spec, kwargs, context)
  extra: dict[str, Any] = {}
  uap_info = None
  with atomic.workdir_lock(workdir):
    done = _prepare_workdir(workdir, fingerprint)
    if done is None and spec.needs_train_set:  # One process computes it, the others reuse it.
      extra, uap_info = _prepare(config, workdir, spec, kwargs, context)
  if done is not None:
    logging.info("%s: already complete in %s (ASR %.2f%%); skipping.", spec.name, workdir,
                 done["attack_success_rate"])
    return done

  ds = context.dataset
  n = int(config.n_examples)
  indices, random_targets = candidates(config, context)
  x, y = ds.images[indices], ds.labels[indices]
  target = _targets(spec, context, indices, random_targets, y)
  fn = spec.fn
  call_kwargs = _call_kwargs(fn, spec, {**_split_kwargs(fn, kwargs), **extra}, config.loop_mode)

  batch_size = min(int(config.batch_size), n)
  pool = work_pool.WorkPool(workdir, n, batch_size)
  first_batch_s, steady_s, steady_n = None, 0.0, 0
  while True:
    with atomic.workdir_lock(workdir):
      if is_finished(workdir):  # Another process finished the run.
        return _saved_results(workdir)
      complete = pool.complete()
      claim = None if complete else pool.claim()
    if complete:
      break
    if claim is None:
      logging.info("%s: waiting for the batches other processes are attacking.", spec.name)
      pool.wait()
      continue
    with claim:
      pos = batching.pad_to(claim.positions, batch_size)
      keys = _example_keys(int(config.seed), pos)
      t_batch = time.perf_counter()
      out = fn(context.logits_fn, x[pos], target[pos], keys, **call_kwargs)
      rows = len(claim.positions)
      result = {"x_adv": np.asarray(out.x_adv)[:rows],
                **{k: np.asarray(getattr(out.info, k))[:rows] for k in _INFO_FIELDS}}
      elapsed = time.perf_counter() - t_batch
      with atomic.workdir_lock(workdir):
        pool.save(claim, {**result, "attack_time_s": np.float64(elapsed)})
        finished = pool.gather(("success",))["success"]
    if first_batch_s is None:
      first_batch_s = elapsed
    else:
      steady_s, steady_n = steady_s + elapsed, steady_n + rows
    logging.info("%s: examples %d-%d done in %.2f s; %d/%d finished, ASR so far %.1f%%.",
                 spec.name, claim.positions[0], claim.positions[-1], elapsed, len(finished), n,
                 100 * np.mean(finished))

  with atomic.workdir_lock(workdir):
    if is_finished(workdir):
      return _saved_results(workdir)
    return _finish(config, workdir, spec, kwargs, context, pool, t0,
                   (indices, x, y, target), uap_info, (first_batch_s, steady_s, steady_n))


def _saved_results(workdir: str) -> dict[str, Any]:
  with open(os.path.join(workdir, "results.json")) as f:
    return json.load(f)


def _finish(config, workdir, spec, kwargs, context: Context, pool: work_pool.WorkPool, t0,
            candidates, uap_info, timing) -> dict[str, Any]:
  """Writes ``adversarial.npz`` and the results from the finished batches; clears the pool."""
  indices, x, y, target = candidates
  first_batch_s, steady_s, steady_n = timing
  n = len(indices)
  arrays = pool.gather(("x_adv",) + _INFO_FIELDS)
  attack_time = pool.total("attack_time_s")
  if not np.array_equal(arrays["positions"], np.arange(n)):
    raise RuntimeError(f"internal error: results for {len(arrays['positions'])} of {n} "
                       "examples.")
  ds = context.dataset
  batch_size = pool.batch_size
  adversarial = {"indices": indices, "x": x, "x_adv": arrays["x_adv"], "y": y,
                 "success": arrays["success"], "predicted": arrays["predicted"],
                 "iterations": arrays["iterations"], "l0": arrays["l0"], "l2": arrays["l2"],
                 "linf": arrays["linf"]}
  if spec.targeted:
    adversarial["target"] = target
  if spec.query_based:
    adversarial["queries"] = arrays["queries"]
  atomic.write_npz(os.path.join(workdir, "adversarial.npz"), adversarial)

  results = _metrics(arrays, y, spec)
  results = {
      "attack": spec.name, "threat": spec.threat, "target_rule": spec.target_rule,
      "query_based": spec.query_based, "reference": spec.reference,
      "settings_table": config.settings, "kwargs": _canonical(kwargs),
      "fixed_kwargs": dict(spec.fixed_kwargs),
      "model": context.model, "weights": context.weights, "weights_id": context.weights_id,
      "dataset": ds.name, "split": config.split, "n_examples": n,
      "candidate_pool": _pool(config), "candidate_seed": int(config.candidate_seed),
      "seed": int(config.seed), "batch_size": batch_size, "loop_mode": config.loop_mode,
      **results,
      "attack_time_s": attack_time,
      "wall_time_s": time.perf_counter() - t0,
      "load_time_s": context.load_time_s,
      "first_batch_s": first_batch_s,
      "examples_per_sec": steady_n / steady_s if steady_s > 0 else None,
      "examples_per_sec_overall": n / attack_time if attack_time > 0 else None,
      "device": device_info(),
  }
  if uap_info is not None:
    results["uap"] = uap_info
  atomic.write_json(os.path.join(workdir, "results.json"), results)
  atomic.write_bytes(os.path.join(workdir, "results.md"), results_markdown(results).encode())
  pool.clear()
  logging.info("%s on %s/%s: ASR %.2f%% over %d examples, mean L2 (successful) %s, %.1f s.",
               spec.name, context.model, ds.name, results["attack_success_rate"], n,
               _fmt(results["mean_l2_successful"]), attack_time)
  return results


def _metrics(arrays: Mapping[str, np.ndarray], y: np.ndarray, spec) -> dict[str, Any]:
  success = arrays["success"].astype(bool)
  out: dict[str, Any] = {
      "n_success": int(success.sum()),
      "attack_success_rate": 100.0 * float(success.mean()),
      "misclassification_rate": 100.0 * float(np.mean(arrays["predicted"] != y)),
  }
  for norm in ("l0", "l2", "linf"):
    values = arrays[norm].astype(np.float64)
    out[f"mean_{norm}_successful"] = float(values[success].mean()) if success.any() else None
    out[f"mean_{norm}_all"] = float(values.mean())
  out["mean_iterations"] = float(arrays["iterations"].mean())
  out["mean_queries"] = float(arrays["queries"].mean())
  out["queries_exact"] = bool(spec.query_based)
  return out


def device_info() -> dict[str, Any]:
  device = jax.devices()[0]
  return {"platform": device.platform, "kind": device.device_kind,
          "count": jax.device_count(), "cpu_count": os.cpu_count()}


def _cell(text: str, limit: int = 200) -> str:
  """Makes free text safe for one Markdown table cell."""
  text = " ".join(str(text).split()).replace("|", "/")
  return text if len(text) <= limit else text[:limit - 3] + "..."


def _fmt(value, spec: str = ".4f") -> str:
  return "n/a" if value is None else format(value, spec)


def results_markdown(results: Mapping[str, Any]) -> str:
  """A Markdown table of one :func:`run_attack` result."""
  kw = ", ".join(f"{k}={v}" for k, v in sorted({**results["kwargs"],
                                                   **results["fixed_kwargs"]}.items()))
  device = results["device"]
  eps = results.get("examples_per_sec")
  rows = [
      ("attack", f"{results['attack']} ({results['threat']}, target: {results['target_rule']})"),
      ("settings", f"{results['settings_table']}: {kw or '(library defaults)'}"),
      ("model / weights", f"{results['model']} / {os.path.basename(results['weights'])}"),
      ("dataset", f"{results['dataset']} ({results['split']})"),
      ("examples", f"{results['n_examples']} (first of {results['candidate_pool']} DEEPSEC "
                   f"candidates, seed {results['candidate_seed']})"),
      ("attack success rate (%)", f"{results['attack_success_rate']:.2f} "
                                  f"({results['n_success']}/{results['n_examples']})"),
      ("misclassification rate (%)", f"{results['misclassification_rate']:.2f}"),
      ("mean L0 / L2 / Linf, successful examples",
       " / ".join(_fmt(results[f"mean_{n}_successful"]) for n in ("l0", "l2", "linf"))),
      ("mean L0 / L2 / Linf, all examples",
       " / ".join(_fmt(results[f"mean_{n}_all"]) for n in ("l0", "l2", "linf"))),
      ("mean queries" + ("" if results["queries_exact"] else " (forward+backward passes)"),
       f"{results['mean_queries']:.1f}"),
      ("attack time (s)", f"{results['attack_time_s']:.1f} (first batch incl. compile: "
                          f"{_fmt(results['first_batch_s'], '.1f')})"),
      ("examples/s (steady state)", _fmt(eps, ".2f")),
      ("device", f"{device['kind']} ({device['platform']}, {device['cpu_count']} CPU cores)"),
  ]
  lines = ["| metric | value |", "|---|---|"] + [f"| {k} | {v} |" for k, v in rows]
  return (f"# {results['attack']} on {results['model']} / {results['dataset']}\n\n"
          + "\n".join(lines) + "\n")


# ----------------------------------------------------------------------------- UAP


def _prepare(config, workdir, spec, kwargs, context: Context):
  """Computes (or reloads) the perturbation of a ``needs_train_set`` attack (UAP).

  DEEPSEC (``UAP_Generation.py``): ``v`` is computed on 10% of the training set (shuffled with
  seed 100) and the fooling rate is measured on the other 90%, with labels. The fraction is
  ``config.uap_train_fraction``. ``prepare(logits_fn, x_train, key, **kwargs)`` returns
  ``(perturbation, info)``; the attack then gets ``perturbation=``. The result is saved in the
  workdir, so a resumed run does not recompute it, and so is the state after each pass while it
  is computed (UAP's ``on_pass``), so an interrupted computation resumes after its last pass.
  """
  path = os.path.join(workdir, _UAP_FILE)
  if os.path.exists(path):
    saved = atomic.read_npz(path)
    logging.info("%s: reusing the perturbation saved in %s.", spec.name, path)
    return {"perturbation": saved["perturbation"]}, json.loads(str(saved["info"]))
  fraction = float(config.uap_train_fraction)
  if not 0.0 < fraction <= 1.0:
    raise ValueError(f"uap_train_fraction must be in (0, 1], got {fraction}.")
  train = data.load(config.dataset, "train", config.data_dir)
  subset, rest = data.deepsec_split(train, 1.0 - fraction, int(config.uap_split_seed))
  prepare = spec.prepare_fn
  prepare_kwargs = _split_kwargs(prepare, kwargs)
  accepted = catalog.accepted_kwargs(prepare)
  if len(rest.labels) and (accepted is None or {"x_val", "labels_val"} <= accepted):
    prepare_kwargs.update(x_val=rest.images, labels_val=rest.labels)
  if accepted is None or "loop_mode" in accepted:
    prepare_kwargs["loop_mode"] = config.loop_mode
  progress_path = os.path.join(workdir, _UAP_PROGRESS)
  if accepted is None or {"on_pass", "resume_from"} <= accepted:
    prepare_kwargs["on_pass"] = lambda state: atomic.write_npz(progress_path, state._asdict())
    if os.path.exists(progress_path):
      try:
        prepare_kwargs["resume_from"] = uap_lib.UAPCheckpoint(**atomic.read_npz(progress_path))
      except TypeError as e:
        raise ValueError(f"{progress_path} is not a UAP checkpoint ({e}); delete it to compute "
                         "the perturbation from the start.") from e
      logging.info("%s: resuming the perturbation after pass %d (saved in %s).", spec.name,
                   len(prepare_kwargs["resume_from"].fooling_rates), progress_path)
  logging.info("%s: computing the perturbation on %d training images (fooling rate on %d).",
               spec.name, len(subset.labels), len(rest.labels) or len(subset.labels))
  resumed = prepare_kwargs.get("resume_from")
  # Passes finished by earlier invocations count towards the total wall time too.
  earlier_pass_seconds = resumed.seconds if resumed is not None else np.zeros(0)
  t0 = time.perf_counter()
  perturbation, info = prepare(context.logits_fn, subset.images, jax.random.key(int(config.seed)),
                               **prepare_kwargs)
  info = _canonical(info._asdict() if hasattr(info, "_asdict") else info)
  info.update(train_fraction=fraction, split_seed=int(config.uap_split_seed),
              n_train=len(subset.labels), n_val=len(rest.labels),
              seconds_total=float(np.sum(earlier_pass_seconds)) + time.perf_counter() - t0,
              resumed_after_pass=len(earlier_pass_seconds))
  perturbation = np.asarray(perturbation)
  atomic.write_npz(path, {"perturbation": perturbation, "info": np.asarray(json.dumps(info))})
  if os.path.exists(progress_path):
    os.remove(progress_path)
  return {"perturbation": perturbation}, info


# ----------------------------------------------------------------------------- reproduce


def attack_config(config: ml_collections.ConfigDict, attack: str) -> ml_collections.ConfigDict:
  """The :func:`run_attack` config for one attack of a :func:`reproduce_attacks` config."""
  sub = default_config()
  for key in sub.keys():
    if key not in ("attack", "n_examples") and key in config:
      sub[key] = config[key]
  sub.attack = attack
  counts = config.n_examples
  sub.n_examples = int(counts[attack]) if attack in counts else int(config.default_n_examples)
  batch_size = config.batch_sizes.get(attack)
  if batch_size is not None:
    sub.batch_size = int(batch_size)
  return sub


class _Row(NamedTuple):
  attack: str
  threat: str
  status: str
  results: dict[str, Any] | None


def reproduce_attacks(config: ml_collections.ConfigDict,
                      workdir: str | os.PathLike) -> dict[str, Any]:
  """Runs several attacks on one model and dataset and tabulates them beside seed-003 Table I.

  Each attack runs in ``<workdir>/<attack>/`` through the resumable runner, so rerunning skips
  finished attacks and resumes an interrupted one. After each attack the summary
  (``results.json``, ``results.md``) is rewritten; it also lists the attacks that earlier runs
  (or a run beside this one) finished in the same workdir with the same settings, so a table
  made in pieces (``config.attacks`` one attack at a time) is whole. Rows follow Table I's order.

  Args:
    config: see :func:`default_reproduce_config`.
    workdir: the output folder.

  Returns:
    The summary written to ``results.json``: ``rows`` (one per attack: ``attack``, ``threat``,
    ``status``, ``n_examples``, ``attack_success_rate``, ``paper_asr``, ``delta``, ``gap``,
    ``mean_l2_successful``, ``attack_time_s``, ...) and the shared settings.

  Raises:
    ValueError / catalog.AttackNotAvailableError: before running anything, for an attack that
      cannot run, unless ``continue_on_error``.
  """
  t0 = time.perf_counter()
  workdir = os.fspath(workdir)
  os.makedirs(workdir, exist_ok=True)
  names = list(config.attacks)
  if not names:
    raise ValueError("config.attacks is empty.")
  if config.paper_column and config.paper_column not in PAPER_TABLE1_ASR:
    raise ValueError(f"paper_column must be one of {sorted(PAPER_TABLE1_ASR)} or empty, got "
                     f"{config.paper_column!r}.")
  resolved: dict[str, tuple[catalog.AttackSpec, dict[str, Any]] | Exception] = {}
  for name in names:
    try:
      resolved[name] = resolve_attack(name, config.settings, config.attack_kwargs,
                                      config.fallback_settings)
    except (ValueError, NotImplementedError) as e:
      if not config.continue_on_error:
        raise type(e)(f"cannot run {name!r}: {e}") from e
      resolved[name] = e
  context = load_context(config)

  rows: list[_Row] = []
  for name in names:
    spec_kwargs = resolved[name]
    threat = catalog.get(name).threat
    if isinstance(spec_kwargs, Exception):
      rows.append(_Row(name, threat, f"not run: {spec_kwargs}", None))
      continue
    spec, kwargs = spec_kwargs
    sub = attack_config(config, name)
    try:
      results = _run(sub, os.path.join(workdir, name), spec, kwargs, context,
                     time.perf_counter())
      rows.append(_Row(name, threat, "done", results))
    except Exception as e:  # Recorded below, or re-raised.
      rows.append(_Row(name, threat, f"failed: {type(e).__name__}: {e}", None))
      if not config.continue_on_error:
        _write_summary(config, workdir, rows, context, t0)
        raise
    _write_summary(config, workdir, rows, context, t0)
  return _write_summary(config, workdir, rows, context, t0)


def summary_rows(rows: Sequence[_Row], paper_column: str) -> list[dict[str, Any]]:
  """One summary dict per attack: our numbers, the paper's, the difference and a gap flag."""
  paper = PAPER_TABLE1_ASR.get(paper_column, {}) if paper_column else {}
  out = []
  for row in rows:
    r = row.results or {}
    asr = r.get("attack_success_rate")
    ref = paper.get(row.attack)
    delta = None if asr is None or ref is None else asr - ref
    out.append({
        "attack": row.attack, "threat": row.threat, "status": row.status,
        "n_examples": r.get("n_examples"), "attack_success_rate": asr, "paper_asr": ref,
        "delta": delta, "gap": delta is not None and abs(delta) > GAP_THRESHOLD,
        "mean_l2_successful": r.get("mean_l2_successful"),
        "mean_linf_successful": r.get("mean_linf_successful"),
        "attack_time_s": r.get("attack_time_s"), "examples_per_sec": r.get("examples_per_sec"),
        "settings_table": r.get("settings_table"), "kwargs": r.get("kwargs"),
    })
  return out


def summary_markdown(summary: Mapping[str, Any]) -> str:
  """The Markdown table of a :func:`reproduce_attacks` summary."""
  column = summary["paper_column"]
  paper_name = {"mnist": "seed-003 Table I col. (c), MNIST",
                "cifar10": "seed-003 Table I col. (h), CIFAR-10"}.get(column, "none")
  lines = [
      f"# Attack reproduction: {summary['model']} on {summary['dataset']}",
      "",
      f"Settings: `{summary['settings']}`"
      + (f" (fallback `{summary['fallback_settings']}`)" if summary["fallback_settings"] else "")
      + f". Paper: {paper_name}, attack success rate on the undefended model over the whole "
      "test set (paper section VI); ours: the first n of DEEPSEC's candidates (correctly "
      f"classified test images, seed {summary['candidate_seed']}). Gaps larger than "
      f"{GAP_THRESHOLD:g} points are flagged.",
      "",
      "| attack | threat | n | ASR (%) | paper ASR (%) | delta (pt) | mean L2 (successful) "
      "| attack time (s) | status |",
      "|---|---|---:|---:|---:|---:|---:|---:|---|",
  ]
  for r in summary["rows"]:
    delta = _fmt(r["delta"], "+.1f") + (" **GAP**" if r["gap"] else "")
    lines.append(
        f"| {r['attack']} | {r['threat']} | {r['n_examples'] or '-'} | "
        f"{_fmt(r['attack_success_rate'], '.1f')} | {_fmt(r['paper_asr'], '.1f')} | {delta} | "
        f"{_fmt(r['mean_l2_successful'], '.3f')} | {_fmt(r['attack_time_s'], '.1f')} | "
        f"{_cell(r['status'])} |")
  gaps = [r["attack"] for r in summary["rows"] if r["gap"]]
  lines += ["", f"Flagged gaps: {', '.join(gaps) if gaps else 'none'}.",
            f"Device: {summary['device']['kind']} ({summary['device']['cpu_count']} CPU cores). "
            f"Total wall time of the last invocation: {summary['wall_time_s']:.0f} s."]
  return "\n".join(lines) + "\n"


def finished_elsewhere(listed, folders: Callable[[str], Sequence[str]]) -> list[str]:
  """Catalogue attacks outside ``listed`` whose runs in every one of ``folders(name)`` are
  finished (by earlier runs, or by a run beside this one)."""
  return [name for name in catalog.names()
          if name not in listed and all(is_finished(f) for f in folders(name))]


def _earlier_rows(config, workdir: str, context: Context) -> list[_Row]:
  """Rows for attacks outside ``config.attacks`` finished in ``workdir`` with these settings."""
  rows = []
  for name in finished_elsewhere(config.attacks, lambda n: [os.path.join(workdir, n)]):
    sub = os.path.join(workdir, name)
    try:
      spec, kwargs = resolve_attack(name, config.settings, config.attack_kwargs,
                                    config.fallback_settings)
      done = _prepare_workdir(sub, _fingerprint(attack_config(config, name), spec, kwargs,
                                                context))
    except (ValueError, NotImplementedError) as e:
      logging.warning("%s: the finished run in %s is left out of the summary: %s", name, sub, e)
      continue
    if done is not None:
      rows.append(_Row(name, spec.threat, "done (earlier run)", done))
  return rows


def table_order(name: str) -> int:
  """Sort key: seed-003 Table I's order, other attacks after it."""
  order = catalog.DEEPSEC_ATTACKS
  return order.index(name) if name in order else len(order)


def _write_summary(config, workdir, rows, context: Context, t0) -> dict[str, Any]:
  rows = rows + _earlier_rows(config, workdir, context)
  rows = sorted(rows, key=lambda row: table_order(row.attack))
  summary = {
      "model": context.model, "weights": context.weights, "dataset": context.dataset.name,
      "split": config.split, "settings": config.settings,
      "fallback_settings": config.fallback_settings, "paper_column": config.paper_column,
      "candidate_seed": int(config.candidate_seed), "seed": int(config.seed),
      "rows": summary_rows(rows, config.paper_column),
      "wall_time_s": time.perf_counter() - t0, "device": device_info(),
  }
  atomic.write_json(os.path.join(workdir, "results.json"), summary)
  atomic.write_bytes(os.path.join(workdir, "results.md"), summary_markdown(summary).encode())
  return summary


__all__ = [
    "Context", "PAPER_TABLE1_ASR", "attack_config", "candidates", "check_fingerprint",
    "clear_context_cache", "deepsec_candidates", "default_config", "default_reproduce_config",
    "device_info", "finished_elsewhere", "is_finished", "load_context", "reproduce_attacks",
    "resolve_attack", "results_markdown", "run_attack", "run_resolved", "summary_markdown",
    "summary_rows", "table_order",
]
