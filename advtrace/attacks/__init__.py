"""Adversarial attacks as pure, jitted, vmapped functions of any ``logits_fn``.

Every attack is ``attack(logits_fn, x, labels, key, *, targeted=False, **hyperparameters)`` and
returns ``AttackOutput(x_adv, info)``; see ``advtrace._src.attacks.base`` for the contract.
"""

from advtrace._src.attacks.base import AttackInfo
from advtrace._src.attacks.base import AttackOutput
from advtrace._src.attacks.base import LogitsFn
from advtrace._src.attacks.bpda import bpda
from advtrace._src.attacks.bpda import bpda_pgd
from advtrace._src.attacks.bpda import quantize
from advtrace._src.attacks.catalog import AttackSpec
from advtrace._src.attacks.catalog import get as get_attack
from advtrace._src.attacks.catalog import names as list_attacks
from advtrace._src.attacks.cw import cw_l2
from advtrace._src.attacks.deepfool import deepfool
from advtrace._src.attacks.ead import ead
from advtrace._src.attacks.gradient import bim
from advtrace._src.attacks.gradient import fgsm
from advtrace._src.attacks.gradient import iterative_attack
from advtrace._src.attacks.gradient import least_likely_target
from advtrace._src.attacks.gradient import mi_fgsm
from advtrace._src.attacks.gradient import pgd
from advtrace._src.attacks.gradient import rfgsm
from advtrace._src.attacks.hopskipjump import hop_skip_jump
from advtrace._src.attacks.jsma import jsma
from advtrace._src.attacks.lbfgs import box_lbfgs
from advtrace._src.attacks.optmargin import optmargin
from advtrace._src.attacks.optmargin import optmargin_noise_success
from advtrace._src.attacks.score_based import bandits
from advtrace._src.attacks.score_based import nes
from advtrace._src.attacks.score_based import simba
from advtrace._src.attacks.score_based import spsa
from advtrace._src.attacks.sign_opt import sign_opt
from advtrace._src.attacks.square import square_attack
from advtrace._src.attacks.uap import UAPCheckpoint
from advtrace._src.attacks.uap import apply_uap
from advtrace._src.attacks.uap import fooling_rate
from advtrace._src.attacks.uap import uap
