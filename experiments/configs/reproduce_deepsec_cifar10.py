r"""seed-003's 18 attacks on the DEEPSEC CIFAR-10 ResNet-20 (Table VII), beside Table I (h).

Command (needs CIFAR-10 prepared as a tfds array_record dataset; it is not in ../shared, and
without it the run stops at once with the data module's DatasetNotFoundError, which says how to
prepare it):
  python experiments/reproduce_attacks.py \
      --config=experiments/configs/reproduce_deepsec_cifar10.py \
      --config.data_dir=/path/to/tensorflow_datasets --workdir=/tmp/reproduce_deepsec_cifar10

Expected runtime on 2 CPU cores: not measured (CIFAR-10 is absent here). Extrapolated from the
MNIST measurements (see ``reproduce_deepsec_mnist.py``) and the measured cost of one forward and
backward pass of ResNet-20, 2.8 times that of the MNIST CNN: about 300 hours, of which OM ~180 h,
BLB <= ~65 h, EAD ~19 h, CW2 ~16 h, SPSA ~10 h; the gradient attacks ~15 minutes; JSMA more than
3x MNIST's per-example cost (3,072 features: 4x the iterations, larger pair searches). Use a GPU.
Expected result: not measured here; the summary lists seed-003 Table I (h) beside ours (FGSM
88.7, RFGSM 99.6, BIM / PGD / UMIFGSM / DeepFool / OM / BPDA 100, UAP 93.1, SPSA 90.2, LLC 13.2,
RLLC 27.6, ILLC / TMIFGSM / JSMA / BLB / CW2 / EAD 100).

Same structure as ``reproduce_deepsec_mnist.py``: the first n of DEEPSEC's 1000 candidates per
attack, resumable; ``--config.settings=deepsec_code_cifar10 --config.fallback_settings=table8``
for DEEPSEC's own commands (UAP fool rate 0.9, OM noise 0.03137).
"""

from advtrace._src.attacks import catalog
from advtrace._src.attacks import runner

N_EXAMPLES = {
    "fgsm": 1000, "rfgsm": 1000, "bim": 1000, "pgd": 1000, "umifgsm": 1000, "uap": 1000,
    "deepfool": 1000, "om": 200, "bpda": 1000, "spsa": 200, "llc": 1000, "rllc": 1000,
    "illc": 1000, "tmifgsm": 1000, "jsma": 200, "blb": 200, "cw2": 200, "ead": 200,
}


def get_config():
  config = runner.default_reproduce_config()
  config.attacks = catalog.DEEPSEC_ATTACKS
  config.settings = "table7_cifar10"
  config.model = "deepsec_resnet20"
  config.weights = "../shared/weights/deepsec/CIFAR10_raw.pt"
  config.dataset = "cifar10"
  config.paper_column = "cifar10"
  config.n_examples.update(N_EXAMPLES)
  return config
