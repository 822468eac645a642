"""Named attack-settings tables: keyword arguments per catalogue attack, with their sources.

Tables (values on the [0, 1] pixel scale; see ``deepsec.md`` §4-5 and ``tracing.md`` §5 of the
project notes):

- ``table7_mnist`` / ``table7_cifar10``: seed-003 Table VII (copied from DEEPSEC) wherever it
  states a value, DEEPSEC's code where it is silent (CW2 MNIST binary steps, ILLC/TMIFGSM
  iterations, OM/CW2/EAD iterations, kappa, EAD's initial constant). BPDA and SPSA, which
  seed-003 runs with Table VIII, take their Table VIII settings here too. Our choices here
  [ours]: CW2, EAD and OM use CW's early abort and SPSA stops an example once it is
  adversarial (DEEPSEC's code has neither; the ``deepsec_code_*`` tables turn the abort off).
- ``deepsec_code_mnist`` / ``deepsec_code_cifar10``: DEEPSEC's ``Attacks/README.md`` commands
  and argparse defaults exactly (UAP fool rate 0.35 / 0.9, EAD 5 binary steps, CIFAR OM noise
  magnitude 0.03137255, DeepFool's extra update). DEEPSEC has no BPDA or SPSA.
- ``table8``: seed-003 Table VIII (from the Trapdoor paper), one setting for both datasets;
  knobs it does not give are our defaults (``attractors.md`` D12).
- ``tracing_blackbox``: the query attacks of the tracing code (``rmin2000/adv_tracing``).
- ``none``: no table; every attack gets its library defaults (plus explicit overrides).

Source tags on every entry: [paper] = the seed-003 table named; [code] = the DEEPSEC (or
tracing) file named; [ours] = our choice where neither gives a value.

Batch sizes in the sources (OM batch 1000 / 1, CW2 batch 10, DEEPSEC's default 100) only
change throughput, never per-example results here, so they are runner settings, not kwargs.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

Settings = dict[str, Any]

_EPS_MNIST, _EPS_CIFAR = 0.3, 0.1

# ------------------------------------------------------------------------------ Table VIII
# [paper] seed-003 Table VIII (settings from the Trapdoor paper), used for BPDA, SPSA and the
# starred rows PGD*, CW2*, EAD* of Table III; deepsec.md §5. Applied literally on both datasets.
TABLE8: dict[str, Settings] = {
    "fgsm": {"eps": 0.3},  # [paper] Table VIII
    "pgd": {"eps": 0.3, "step_size": 0.04, "num_steps": 100,  # [paper] Table VIII
            "random_start": True},  # [code] DEEPSEC PGD.py / Madry: uniform random start
    # BPDA's preprocessing is bpda_pgd's default: [ours] attractors.md D12, 8-bit input
    # quantisation round(255 x) / 255 forward, identity backward.
    "bpda": {"eps": 0.3, "step_size": 0.04, "num_steps": 100,  # [paper] Table VIII
             "random_start": True},  # [ours] as PGD
    "spsa": {"eps": 0.3, "learning_rate": 0.1, "num_steps": 500,  # [paper] Table VIII
             "delta": 0.01,  # [ours] D12 = cleverhans' SPSA default
             "num_samples": 128,  # [ours] D12: 128 antithetic pairs = 256 queries per step
             "loss": "margin"},  # [ours] D12: margin-logit loss; Adam at Table VIII's lr
    "cw2": {"binary_search_steps": 20, "learning_rate": 0.1,  # [paper] Table VIII
            "max_iterations": 500, "initial_const": 1e-3,  # [paper] Table VIII
            "kappa": 0.0,  # [code] DEEPSEC CW2_Generation.py default
            "abort_early": False},  # [code] DEEPSEC CW2.py has no early abort
    "ead": {"binary_search_steps": 20, "learning_rate": 0.5,  # [paper] Table VIII
            "max_iterations": 500, "initial_const": 1e-3,  # [paper] Table VIII
            "beta": 1e-3,  # [code] DEEPSEC EAD_Generation.py default (Table VIII silent)
            "kappa": 0.0, "decision_rule": "en",  # [code] DEEPSEC EAD_Generation.py defaults
            "abort_early": False},  # [code] DEEPSEC EAD.py has no early abort
}


def _table7(eps: float, step: float, om: Settings, cw_binary_steps: int) -> dict[str, Settings]:
  """Table VII for one dataset; entries common to both datasets are written once here."""
  return {
      # --- untargeted
      "fgsm": {"eps": eps},  # [paper] Table VII
      # [paper] Table VII "eps/2, alpha eps/2" = DEEPSEC's eps with alpha_ratio 0.5: a random
      # sign step of eps/2, then an FGSM step of eps/2 (our rfgsm: alpha = random step).
      "rfgsm": {"eps": eps, "alpha": eps / 2},
      "bim": {"eps": eps, "step_size": step, "num_steps": 15},  # [paper] Table VII
      "pgd": {"eps": eps, "step_size": step, "num_steps": 15,  # [paper] Table VII
              "random_start": True},  # [code] DEEPSEC PGD.py: uniform start in the eps-ball
      "umifgsm": {"eps": eps, "step_size": step, "num_steps": 15,  # [paper] Table VII
                  "decay": 1.0},  # [code] UMIFGSM_Generation.py decay_factor; raw-gradient sum
      # UAP is computed on 10% of the training split, its fooling rate measured on the other
      # 90% with labels [code] UAP_Generation.py; runner config uap_train_fraction.
      "uap": {"eps": eps, "norm": "linf",  # [paper] Table VII; Linf [code] UAP.py
              "fool_rate": 0.3,  # [paper] Table VII (code: 0.35 MNIST / 0.9 CIFAR-10)
              "max_outer_iters": 20,  # [code] UAP_Generation.py max_iter_universal
              "deepfool_overshoot": 0.02,  # [code] UAP_Generation.py overshoot
              "deepfool_max_iter": 10},  # [code] UAP_Generation.py max_iter_deepfool
      "deepfool": {"overshoot": 0.02, "max_iter": 50},  # [paper] Table VII; L2 [code]
      "om": om,
      "bpda": copy.deepcopy(TABLE8["bpda"]),  # [paper] seed-003 runs BPDA with Table VIII
      "spsa": {**TABLE8["spsa"],  # [paper] seed-003 runs SPSA with Table VIII
               "early_stop": True},  # [ours] stop an example once it is adversarial
      # --- targeted
      "llc": {"eps": eps},  # [paper] Table VII; target = least-likely class [code]
      "rllc": {"eps": eps, "alpha": eps / 2},  # [paper] Table VII, as rfgsm
      "illc": {"eps": eps, "step_size": step,  # [paper] Table VII
               "num_steps": 10},  # [code] ILLC_Generation.py default (Table VII silent)
      "tmifgsm": {"eps": eps, "step_size": step,  # [paper] Table VII
                  "num_steps": 15,  # [code] TMIFGSM_Generation.py default (Table VII silent)
                  "decay": 1.0},  # [code] TMIFGSM_Generation.py decay_factor
      "jsma": {"theta": 1.0, "gamma": 0.1},  # [paper] Table VII
      "blb": {"binary_search_steps": 5, "max_iterations": 1000,  # [paper] Table VII
              "initial_const": 0.01},  # [paper] Table VII
      "cw2": {"binary_search_steps": cw_binary_steps,  # see the callers
              "learning_rate": 0.02, "max_iterations": 10000,  # [paper] Table VII
              "initial_const": 1e-3,  # [paper] Table VII
              "kappa": 0.0,  # [code] CW2_Generation.py --confidence=0
              "abort_early": True},  # [ours] CW's own early abort; DEEPSEC has none
      "ead": {"binary_search_steps": 10,  # [paper] Table VII (code default: 5)
              "learning_rate": 0.02, "max_iterations": 10000,  # [paper] Table VII
              "beta": 1e-3,  # [paper] Table VII
              "initial_const": 1e-3,  # [code] EAD_Generation.py default (Table VII silent)
              "kappa": 0.0, "decision_rule": "en",  # [code] README: --confidence=0 --EN=True
              "abort_early": True},  # [ours] EAD's own early abort; DEEPSEC has none
  }


TABLE7_MNIST = _table7(
    _EPS_MNIST, 0.05,
    om={"initial_const": 0.02, "binary_search_steps": 4,  # [paper] Table VII MNIST
        "learning_rate": 0.2, "noise_count": 20, "noise_mag": 0.3,  # [paper] Table VII
        "max_iterations": 10000, "kappa": 0.0,  # [code] OM_Generation.py defaults
        "noise_scaling": "linf", "decision_rule": "point",  # [code] DEEPSEC OptMargin.py
        "abort_early": True},  # [ours] OM's (CW's) early abort; DEEPSEC has none
    cw_binary_steps=10)  # [code] CW2_Generation.py search_steps (Table VII MNIST silent)

TABLE7_CIFAR10 = _table7(
    _EPS_CIFAR, 0.01,
    om={"initial_const": 1.0, "binary_search_steps": 4,  # [paper] Table VII CIFAR-10
        "learning_rate": 0.02, "noise_count": 20,  # [paper] Table VII CIFAR-10
        "noise_mag": 0.3,  # [paper] Table VII (code: 0.03137255, see deepsec_code)
        "max_iterations": 10000, "kappa": 0.0,  # [code] OM_Generation.py defaults
        "noise_scaling": "linf", "decision_rule": "point",  # [code] DEEPSEC OptMargin.py
        "abort_early": True},  # [ours] OM's (CW's) early abort; DEEPSEC has none
    cw_binary_steps=10)  # [paper] Table VII CIFAR-10


def _deepsec_code(table7: Mapping[str, Settings], *, fool_rate: float,
                  om_noise: float) -> dict[str, Settings]:
  """DEEPSEC's commands: Table VII where they agree, the code's values where they differ."""
  table = {k: copy.deepcopy(v) for k, v in table7.items() if k not in ("bpda", "spsa")}
  table["uap"]["fool_rate"] = fool_rate  # [code] Attacks/README.md UAP command
  table["uap"]["deepsec_dr"] = True  # [code] UAP.py adds DeepFool's r without the overshoot
  table["om"]["noise_mag"] = om_noise  # [code] Attacks/README.md OM command
  table["ead"]["binary_search_steps"] = 5  # [code] EAD_Generation.py search_steps default
  table["deepfool"]["deepsec_extra_step"] = True  # [code] DEEPFOOL.py updates once more
  for name in ("cw2", "ead", "om"):
    table[name]["abort_early"] = False  # [code] DEEPSEC's CW2.py, EAD.py, OM.py never abort
  return table


DEEPSEC_CODE_MNIST = _deepsec_code(TABLE7_MNIST, fool_rate=0.35, om_noise=0.3)
DEEPSEC_CODE_CIFAR10 = _deepsec_code(TABLE7_CIFAR10, fool_rate=0.9, om_noise=0.03137255)

# ------------------------------------------------------------------------------ tracing
# [code] rmin2000/adv_tracing attacks/*.py (tracing.md §5): untargeted, L2 where a norm applies,
# raw [0, 1] pixels. SimBA and HopSkipJump are ART 1.10.3's with ART defaults.
TRACING_BLACKBOX: dict[str, Settings] = {
    # [code] bandit.py: L2 eps 1, image lr 0.01, prior lr 0.1, exploration 0.1, fd_eta 0.01,
    # prior 20x20 (data_size 32), CE; 10,000 loss queries at 2 per step = 5,000 steps, i.e.
    # 1 + 5000 * 3 queries here, where the success check of each iterate is counted too.
    "bandits": {"norm": "l2", "eps": 1.0, "image_lr": 0.01, "online_lr": 0.1,
                "exploration": 0.1, "fd_eta": 0.01, "prior_size": 20,
                "convention": "blackboxbench", "loss": "ce", "early_stop": True,
                "max_queries": 15001},
    # [code] nes.py: L2 eps 1, lr 0.01, fd_eta (sigma) 0.01, q = 15 antithetic pairs, CE;
    # The reference checks ``queries < 10000`` before each step of 30 loss queries, so it runs
    # 334 steps, i.e. 1 + 334 * 31 counted queries here (each iterate's check is counted).
    "nes": {"norm": "l2", "eps": 1.0, "step_size": 0.01, "sigma": 0.01, "num_samples": 15,
            "loss": "ce", "early_stop": True, "max_queries": 1 + 334 * 31},
    # [code] simba.py = ART 1.10.3 SimBA: eps (step) 0.1, max_iter 3000, pixel basis; ART queries
    # both sides every iteration, so its budget is 2 x 3000 (+1 start query).
    "simba": {"step_size": 0.1, "num_iters": 3000, "max_queries": 6001},
    # [code] ART SimBA with attack='dct': freq_dim 4, stride 1 (ART defaults).
    "simba_dct": {"step_size": 0.1, "num_iters": 3000, "max_queries": 6001, "freq_dim": 4,
                  "stride": 1},
    # [code] hsj.py = ART 1.10.3 HopSkipJump defaults: L2, max_iter 50, max_eval 10,000,
    # init_eval 100, init_size 100, no query budget (ART's batch 64 only sets throughput).
    "hsj": {"norm": "l2", "num_iterations": 50, "max_num_evals": 10000, "init_num_evals": 100,
            "init_size": 100, "max_queries": None},
    # [code] signopt.py: alpha 0.2, beta 0.001, k = 200 sign queries, 10 random initial
    # directions, <= 1500 iterations, 10,000 queries; success only if ||delta||_2 < 1
    # (epsilon). The code does not clip to [0, 1]; ours does [ours] (tracing.md §8.11).
    "sign_opt": {"alpha": 0.2, "beta": 0.001, "k": 200, "num_directions": 10,
                 "num_iterations": 1500, "max_queries": 10000, "epsilon": 1.0},
    # [ours] tracing.md §8.12: a white-box reference attack on the source copy (not in the code).
    "pgd_l2": {"eps": 1.0, "step_size": 0.1, "num_steps": 50, "random_start": True},  # [ours]
}

NONE = "none"

TABLES: Mapping[str, Mapping[str, Settings]] = {
    "table7_mnist": TABLE7_MNIST,
    "table7_cifar10": TABLE7_CIFAR10,
    "deepsec_code_mnist": DEEPSEC_CODE_MNIST,
    "deepsec_code_cifar10": DEEPSEC_CODE_CIFAR10,
    "table8": TABLE8,
    "tracing_blackbox": TRACING_BLACKBOX,
    NONE: {},
}


def table_names() -> list[str]:
  """Every settings-table name, sorted."""
  return sorted(TABLES)


def get_table(table: str) -> dict[str, Settings]:
  """A deep copy of a whole table (``{attack: kwargs}``).

  Raises:
    ValueError: for an unknown table name, listing the valid ones.
  """
  if table not in TABLES:
    raise ValueError(f"Unknown settings table {table!r}. Valid tables: "
                     f"{', '.join(table_names())}.")
  return copy.deepcopy(dict(TABLES[table]))


def get_settings(table: str, attack: str) -> Settings:
  """The keyword arguments ``table`` gives ``attack`` (a fresh copy; ``{}`` for ``'none'``).

  Args:
    table: a table name (see :func:`table_names`).
    attack: a catalogue attack name.

  Raises:
    ValueError: for an unknown table, or an attack the table has no entry for (naming the
      attacks it has and the tables that do have one).
  """
  entries = get_table(table)
  if table == NONE:
    return {}
  if attack not in entries:
    others = [t for t in table_names() if attack in TABLES[t]]
    hint = (f" Tables with an entry for {attack!r}: {', '.join(others)}." if others else
            f" No table has {attack!r}; use table 'none' (library defaults) with explicit "
            "kwargs.")
    raise ValueError(f"Settings table {table!r} has no entry for attack {attack!r}; it covers "
                     f"{', '.join(sorted(entries))}.{hint}")
  return entries[attack]
