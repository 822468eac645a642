r"""Injected attractors on the DEEPSEC CIFAR-10 ResNet-20 (needs tfds CIFAR-10 in data_dir).

Command:
  python experiments/attractors.py --config=experiments/configs/attractors_cifar10.py \
      --config.data_dir=../shared/tensorflow_datasets --workdir=/tmp/attractors_cifar10

Expected runtime: not measured (CIFAR-10 is not on our machines); the ResNet-20 attacks cost
roughly 10x the MNIST CNN's per example. Expected result: seed-003's CIFAR-10 columns (h)-(l),
printed beside ours in results.md. Without the dataset the binary stops with an error that says
how to prepare it.
"""

from advtrace._src import attractor_experiment
from experiments.configs import reproduce_deepsec_cifar10


def get_config():
  config = attractor_experiment.default_config()
  config.settings = "table7_cifar10"
  config.model = "deepsec_resnet20"
  config.weights = "../shared/weights/deepsec/CIFAR10_raw.pt"
  config.dataset = "cifar10"
  config.paper_column = "cifar10"
  config.calibration_fraction = 0.1  # D9: 5,000 of 50,000 training images
  config.n_examples.update(reproduce_deepsec_cifar10.N_EXAMPLES)
  return config
