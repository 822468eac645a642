r"""Injected attractors on the DEEPSEC MNIST CNN: seed-003 Tables I-VI, Figs. 5 and 7, ablations.

Command:
  python experiments/attractors.py --config=experiments/configs/attractors_mnist.py \
      --config.data_dir=../shared/tensorflow_datasets --workdir=/tmp/attractors_mnist \
      --config.victim_workdir=/tmp/reproduce_deepsec_mnist

``victim_workdir`` reuses (or fills) the runs on C of ``reproduce_deepsec_mnist.py`` with the
same settings; leave it out to run them in ``<workdir>/victim``. The QIM key is created on the
first run in ``<workdir>.secret/`` (mode 0600) unless ``--config.key_path`` names one.

Expected runtime on 2 shared CPU cores (measured 2026-11-21): ~28 minutes for Table II, the
calibration, Figs. 5 and 7, the 12 fast attacks (FGSM ... JSMA, n as below) on M and on M_(d,r)
and the ablations, once the runs on C exist (``reproduce_deepsec_mnist.py``, ~10 minutes for the
same 12). The costly attacks (CW2, EAD, BLB, OM, SPSA, UAP) take hours each, as in
``reproduce_deepsec_mnist.py``; finished attacks are kept, so the run can be done in pieces, e.g.
``--config.attacks="('fgsm','pgd')"``. The same command started once per core (each pinned,
one XLA thread) shares each attack's batches between the runs.

Expected result (measured; docs/results/attractors_mnist.md): clean accuracy C 99.34%, M 99.34%;
realised test FPR 5.01% / 0.46% at the 5% / 0.5% operating points; overall attack success rate
(Table I (g)) 0.0-0.7% for FGSM, RFGSM, BIM, PGD, UMIFGSM, UAP, DeepFool, BPDA, SPSA (200),
LLC, RLLC, ILLC, TMIFGSM, BLB (200) and CW2 (200) with detection 95.9-100%, and 9.4% for JSMA
(2.1% detected: saturated pixels are a blind spot of the periodic QIM lattice) and 19.0% for
EAD (200; 81.0% detected: at c = 100 its large unstructured perturbations overpower M), and
29.0% for OM (200, another key; 32.0% succeed on M and only 6 of those 64 are detected, since
OM's noisy copies blur W's step-3 lattice). Integrated setting (Table V): 10 of the 18 attacks
succeed on M_(d,r) for more than 80% of their examples (e.g. FGSM 99.6%, OM 98.5%; paper 0.7%
and 17.5%). On one core, on M, CW2 took 1.8 h for its 200 examples, EAD 1 h, UAP 8 minutes,
OM 8.4 h at batch 1 (``batch_sizes.om``, ~150 s per example); OM on M_(d,r) costs about as
much. On an H100, OM on C took 294 s for its 200 (``--config.batch_sizes.om=100``; ``loop_mode``
"auto" fuses the loops there).
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
  config.batch_sizes.update(reproduce_deepsec_mnist.BATCH_SIZES)
  return config
