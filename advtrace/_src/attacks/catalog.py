"""The named attack catalogue: DEEPSEC / seed-003 attack names mapped to library functions.

Each entry is an :class:`AttackSpec`: which function implements the attack (with any fixed
keyword arguments, e.g. ``norm="l2"`` for ``fgm_l2``), whether it is run targeted, how the
target is chosen, and whether it is query-based or needs a training set (UAP).

Targets (``target_rule``), as in DEEPSEC's ``CleanDatasets/CandidatesSelection.py``:

- ``"true"``: untargeted; the attack gets the true labels.
- ``"least_likely"``: the class with the lowest logit on the clean input (LLC, R+LLC, ILLC).
- ``"random"``: a class other than the true label drawn from a seeded generator (TMIFGSM, JSMA,
  BLB, CW2, EAD); seed-003 Table I: "Targeted: classified as a randomly chosen target".

Implementations are resolved lazily (``spec.fn``), so the catalogue imports even while an
attack module is missing; :func:`available` tells which entries can run.

The mapping (seed-003 / DEEPSEC name -> library call):

- LLC = targeted ``fgsm`` at the least-likely class; RLLC = targeted ``rfgsm`` at the
  least-likely class; ILLC = targeted ``bim`` at the least-likely class.
- UMIFGSM / TMIFGSM = ``mi_fgsm`` with DEEPSEC's raw-gradient momentum, untargeted / targeted
  at DEEPSEC's random target; ``mi_fgsm_dong`` is Dong et al.'s L1-normalised form.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import inspect
from collections.abc import Callable
from collections.abc import Mapping
from typing import Any

THREATS = ("untargeted", "targeted")
TARGET_RULES = ("true", "least_likely", "random")

_PACKAGE = "advtrace._src.attacks"


class AttackNotAvailableError(NotImplementedError):
  """The module or function implementing a catalogue entry does not exist (yet)."""


@dataclasses.dataclass(frozen=True)
class AttackSpec:
  """One named attack.

  Attributes:
    name: the catalogue name (``"fgsm"``, ``"llc"``, ``"cw2"``, ...).
    impl: ``"module:function"`` inside ``advtrace._src.attacks`` (resolved lazily), or a
      callable with the attack contract of ``advtrace._src.attacks.base``.
    threat: ``"untargeted"`` or ``"targeted"``; targeted attacks are called with
      ``targeted=True`` and the target labels.
    target_rule: ``"true"``, ``"least_likely"`` or ``"random"`` (see the module docstring).
    query_based: the attack only queries the model (score- or decision-based); its per-example
      query counts are exact and are saved by the runner.
    needs_train_set: the attack first computes something on training data (UAP's universal
      perturbation) with ``prepare``, then ``fn`` applies it.
    reference: the paper.
    fixed_kwargs: keyword arguments bound into ``fn`` (they define the entry, e.g. the norm).
    prepare: for ``needs_train_set`` entries, ``"module:function"`` or a callable that computes
      the per-attack state from training data (see ``advtrace._src.attacks.runner``).
  """
  name: str
  impl: str | Callable[..., Any]
  threat: str
  target_rule: str
  query_based: bool = False
  needs_train_set: bool = False
  reference: str = ""
  fixed_kwargs: tuple[tuple[str, Any], ...] = ()
  prepare: str | Callable[..., Any] | None = None

  def __post_init__(self):
    if self.threat not in THREATS:
      raise ValueError(f"{self.name}: threat must be one of {THREATS}, got {self.threat!r}.")
    if self.target_rule not in TARGET_RULES:
      raise ValueError(f"{self.name}: target_rule must be one of {TARGET_RULES}, got "
                       f"{self.target_rule!r}.")
    if (self.threat == "untargeted") != (self.target_rule == "true"):
      raise ValueError(f"{self.name}: untargeted attacks use target_rule 'true' and targeted "
                       f"ones 'least_likely' or 'random'; got {self.threat}/{self.target_rule}.")
    if self.needs_train_set and self.prepare is None:
      raise ValueError(f"{self.name}: needs_train_set requires a prepare function.")

  @property
  def targeted(self) -> bool:
    return self.threat == "targeted"

  @property
  def fn(self) -> Callable[..., Any]:
    """The attack function with ``fixed_kwargs`` bound.

    Raises:
      AttackNotAvailableError: if the implementing module or function does not exist.
    """
    fn = _resolve(self.impl, self.name)
    return functools.partial(fn, **dict(self.fixed_kwargs)) if self.fixed_kwargs else fn

  @property
  def prepare_fn(self) -> Callable[..., Any] | None:
    """The resolved ``prepare`` function (None for attacks without one)."""
    return None if self.prepare is None else _resolve(self.prepare, self.name)

  @property
  def available(self) -> bool:
    """Whether ``fn`` (and ``prepare_fn``) resolve."""
    try:
      self.fn  # noqa: B018  (resolving is the check)
      self.prepare_fn  # noqa: B018
    except AttackNotAvailableError:
      return False
    return True

  def accepted_kwargs(self) -> set[str] | None:
    """Keyword names ``fn`` accepts beyond the fixed ones, or None if it takes ``**kwargs``."""
    return accepted_kwargs(self.fn)


def accepted_kwargs(fn: Callable[..., Any]) -> set[str] | None:
  """Keyword names ``fn`` accepts, or None if it takes ``**kwargs``."""
  params = inspect.signature(fn).parameters.values()
  if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
    return None
  return {p.name for p in params if p.kind in (inspect.Parameter.KEYWORD_ONLY,
                                               inspect.Parameter.POSITIONAL_OR_KEYWORD)}


def _resolve(impl: str | Callable[..., Any], name: str) -> Callable[..., Any]:
  if callable(impl):
    return impl
  module_name, _, function = impl.partition(":")
  try:
    module = importlib.import_module(f"{_PACKAGE}.{module_name}")
  except ModuleNotFoundError as e:
    if e.name != f"{_PACKAGE}.{module_name}":
      raise  # A genuine missing dependency inside an existing module.
    raise AttackNotAvailableError(
        f"attack {name!r} is implemented by {_PACKAGE}.{module_name}.{function}, but the module "
        f"{_PACKAGE}.{module_name} does not exist yet.") from e
  fn = getattr(module, function, None)
  if fn is None:
    raise AttackNotAvailableError(
        f"attack {name!r} is implemented by {_PACKAGE}.{module_name}.{function}, but the module "
        f"has no function {function!r}.")
  return fn


def _spec(name, impl, threat="untargeted", target_rule="true", *, reference, query_based=False,
          fixed=None, prepare=None):
  return AttackSpec(name=name, impl=impl, threat=threat, target_rule=target_rule,
                    query_based=query_based, needs_train_set=prepare is not None,
                    reference=reference, fixed_kwargs=tuple(sorted((fixed or {}).items())),
                    prepare=prepare)


_GOODFELLOW = "Goodfellow et al., ICLR 2015, https://arxiv.org/abs/1412.6572"
_TRAMER = "Tramer et al., ICLR 2018, https://arxiv.org/abs/1705.07204"
_KURAKIN = "Kurakin et al., ICLR-W 2017, https://arxiv.org/abs/1607.02533"
_MADRY = "Madry et al., ICLR 2018, https://arxiv.org/abs/1706.06083"
_DONG = "Dong et al., CVPR 2018, https://arxiv.org/abs/1710.06081"
_UAP = "Moosavi-Dezfooli et al., CVPR 2017, https://arxiv.org/abs/1610.08401"
_DEEPFOOL = "Moosavi-Dezfooli et al., CVPR 2016, https://arxiv.org/abs/1511.04599"
_OM = "He, Li, Song, ICLR 2018 (OptMargin), https://openreview.net/forum?id=BkpiPMbA-"
_BPDA = "Athalye, Carlini, Wagner, ICML 2018, https://arxiv.org/abs/1802.00420"
_SPSA = "Uesato et al., ICML 2018, https://arxiv.org/abs/1802.05666"
_JSMA = "Papernot et al., EuroS&P 2016, https://arxiv.org/abs/1511.07528"
_BLB = "Szegedy et al., ICLR 2014, https://arxiv.org/abs/1312.6199"
_CW = "Carlini & Wagner, IEEE S&P 2017, https://arxiv.org/abs/1608.04644"
_EAD = "Chen et al., AAAI 2018, https://arxiv.org/abs/1709.04114"
_NES = "Ilyas et al., ICML 2018, https://arxiv.org/abs/1804.08598"
_BANDITS = "Ilyas, Engstrom, Madry, ICLR 2019, https://arxiv.org/abs/1807.07978"
_SIMBA = "Guo et al., ICML 2019, https://arxiv.org/abs/1905.07121"
_SQUARE = "Andriushchenko et al., ECCV 2020, https://arxiv.org/abs/1912.00049"
_HSJ = "Chen, Jordan, Wainwright, IEEE S&P 2020, https://arxiv.org/abs/1904.02144"
_SIGN_OPT = "Cheng et al., ICLR 2020, https://arxiv.org/abs/1909.10773"

_T, _LL, _R = "targeted", "least_likely", "random"

_SPECS = (
    # The 18 seed-003 / DEEPSEC attacks (seed-003 Table I order). Untargeted:
    _spec("fgsm", "gradient:fgsm", reference=_GOODFELLOW),
    _spec("rfgsm", "gradient:rfgsm", reference=_TRAMER),
    _spec("bim", "gradient:bim", reference=_KURAKIN),
    _spec("pgd", "gradient:pgd", reference=_MADRY),
    _spec("umifgsm", "gradient:mi_fgsm", reference=_DONG, fixed={"normalize_grad": False}),
    _spec("uap", "uap:uap_attack", reference=_UAP, prepare="uap:uap"),
    _spec("deepfool", "deepfool:deepfool", reference=_DEEPFOOL, fixed={"norm": "l2"}),
    _spec("om", "optmargin:optmargin", reference=_OM),
    _spec("bpda", "bpda:bpda_pgd", reference=_BPDA),
    _spec("spsa", "score_based:spsa", reference=_SPSA, query_based=True),
    # Targeted:
    _spec("llc", "gradient:fgsm", _T, _LL, reference=_KURAKIN),
    _spec("rllc", "gradient:rfgsm", _T, _LL, reference=_TRAMER),
    _spec("illc", "gradient:bim", _T, _LL, reference=_KURAKIN),
    _spec("tmifgsm", "gradient:mi_fgsm", _T, _R, reference=_DONG,
          fixed={"normalize_grad": False}),
    _spec("jsma", "jsma:jsma", _T, _R, reference=_JSMA),
    _spec("blb", "lbfgs:box_lbfgs", _T, _R, reference=_BLB),
    _spec("cw2", "cw:cw_l2", _T, _R, reference=_CW),
    _spec("ead", "ead:ead", _T, _R, reference=_EAD),
    # The rest of the library.
    _spec("fgm_l2", "gradient:fgsm", reference=_GOODFELLOW, fixed={"norm": "l2"}),
    _spec("fgm_l1", "gradient:fgsm", reference=_GOODFELLOW, fixed={"norm": "l1"}),
    _spec("pgd_l2", "gradient:pgd", reference=_MADRY, fixed={"norm": "l2"}),
    _spec("mi_fgsm_dong", "gradient:mi_fgsm", reference=_DONG, fixed={"normalize_grad": True}),
    _spec("deepfool_linf", "deepfool:deepfool", reference=_DEEPFOOL, fixed={"norm": "linf"}),
    _spec("nes", "score_based:nes", reference=_NES, query_based=True),
    _spec("bandits", "score_based:bandits", reference=_BANDITS, query_based=True),
    _spec("simba", "score_based:simba", reference=_SIMBA, query_based=True,
          fixed={"basis": "pixel"}),
    _spec("simba_dct", "score_based:simba", reference=_SIMBA, query_based=True,
          fixed={"basis": "dct"}),
    _spec("square", "square:square_attack", reference=_SQUARE, query_based=True),
    _spec("hsj", "hopskipjump:hop_skip_jump", reference=_HSJ, query_based=True),
    _spec("sign_opt", "sign_opt:sign_opt", reference=_SIGN_OPT, query_based=True),
)

CATALOG: Mapping[str, AttackSpec] = {s.name: s for s in _SPECS}

DEEPSEC_ATTACKS: tuple[str, ...] = (
    "fgsm", "rfgsm", "bim", "pgd", "umifgsm", "uap", "deepfool", "om", "bpda", "spsa",
    "llc", "rllc", "illc", "tmifgsm", "jsma", "blb", "cw2", "ead")
"""The 18 attacks of seed-003 Table I, in its order (10 untargeted, then 8 targeted)."""


def names() -> list[str]:
  """Every catalogue name, sorted."""
  return sorted(CATALOG)


def get(name: str) -> AttackSpec:
  """The :class:`AttackSpec` for ``name``.

  Raises:
    ValueError: for an unknown name, listing the valid ones.
  """
  if name not in CATALOG:
    raise ValueError(f"Unknown attack {name!r}. Valid names: {', '.join(names())}.")
  return CATALOG[name]


def available() -> dict[str, bool]:
  """Whether each catalogue entry's implementation exists (``{name: bool}``)."""
  return {name: CATALOG[name].available for name in names()}
