"""Adversarial attacks as pure, jitted, vmapped functions of any ``logits_fn``."""

# pylint: disable=g-importing-member
from advtrace._src.attacks.base import AttackInfo
from advtrace._src.attacks.base import AttackOutput
from advtrace._src.attacks.base import LogitsFn
from advtrace._src.attacks.gradient import bim
from advtrace._src.attacks.gradient import fgsm
from advtrace._src.attacks.gradient import iterative_attack
from advtrace._src.attacks.gradient import least_likely_target
from advtrace._src.attacks.gradient import mi_fgsm
from advtrace._src.attacks.gradient import pgd
from advtrace._src.attacks.gradient import rfgsm
