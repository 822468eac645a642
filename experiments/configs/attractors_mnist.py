r"""Injected attractors on the DEEPSEC MNIST CNN: seed-003 Tables I-VI, Figs. 5 and 7, ablations.

Command:
  python experiments/attractors.py --config=experiments/configs/attractors_mnist.py \
      --config.data_dir=../shared/tensorflow_datasets --workdir=/tmp/attractors_mnist \
      --config.victim_workdir=/tmp/reproduce_deepsec_mnist

``victim_workdir`` reuses (or fills) the runs on C of ``reproduce_deepsec_mnist.py`` with the
same settings; leave it out to run them in ``<workdir>/victim``. The QIM key is created on the
first run in ``<workdir>.secret/`` (mode 0600) unless ``--config.key_path`` names one.

Expected runtime and result: see docs/results/attractors_mnist.md (measured there). The costly
attacks (CW2, EAD, BLB, OM, SPSA, UAP) take hours each on 2 CPU cores, as in
``reproduce_deepsec_mnist.py``; finished attacks are kept, so the run can be done in pieces,
e.g. ``--config.attacks="('fgsm','pgd')" --config.stages="('table1',)"``.
"""

from advtrace._src import attractor_experiment
from experiments.configs import reproduce_deepsec_mnist


def get_config():
  config = attractor_experiment.default_config()
  config.settings = "table7_mnist"
  config.model = "deepsec_mnist"
  config.weights = "../shared/weights/deepsec/MNIST_raw.pt"
  config.dataset = "mnist"
  config.paper_column = "mnist"
  config.n_examples.update(reproduce_deepsec_mnist.N_EXAMPLES)
  return config
