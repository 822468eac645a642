r"""seed-003's 18 attacks on the DEEPSEC MNIST CNN with Table VII settings, beside Table I (c).

Command:
  python experiments/reproduce_attacks.py \
      --config=experiments/configs/reproduce_deepsec_mnist.py \
      --config.data_dir=../shared/tensorflow_datasets --workdir=/tmp/reproduce_deepsec_mnist

Expected runtime on 2 CPU cores (measured 2026-11-21, n as below; Table VII's early-abort rules
on): the 11 gradient attacks (FGSM ... TMIFGSM, DeepFool, BPDA) 3 minutes together (plus ~1
minute of loading and compiling), JSMA 3 minutes, SPSA 6 minutes (it stops an example once it is
adversarial), BLB 5 minutes, UAP 25 minutes (5 passes), CW2 ~1.3 h and EAD ~1.9 h (on one core).
OM is the long one: 20 noisy copies per step, 4 rounds of 2,000-3,000 Adam steps each (with
early abort), measured ~200 s per example on one pinned core at batch 1 (``BATCH_SIZES``), so
~11 core-hours for 200 (each example is already 20 model inputs, so on a CPU a larger batch
gains nothing: ``benchmarks/gathering.py``); ``deepsec_code_mnist`` (no early abort) takes
longer for CW2/EAD/OM too. UAP makes up to 20 passes until the fooling rate reaches 30%. A
GPU (``loop_mode`` "auto" then fuses the loops) cuts all of this by orders of magnitude (OM's
200 took 294 s on one H100 with ``--config.batch_sizes.om=100``, 2026-11-23); on CPU, run the
costly attacks last or apart (``--config.attacks="('om',)"``): every finished attack is kept.
On 2 cores, two such runs side by side, each pinned to one core with one XLA thread
(``XLA_FLAGS="--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1" taskset -c 0
...``), did 1.2-1.3x the work of one run on both cores (``benchmarks/parallel_streams.py``);
the same command started twice that way shares one attack's batches between the two runs.

Expected result (measured, first 1,000 candidates; seed-003 Table I (c) in brackets): FGSM 79.9
(90.4, a flagged 10.5-point gap), RFGSM 72.0 (65.6), BIM 100 (100), PGD 100 (100), UMIFGSM 100
(100), DeepFool 100 (100), BPDA 100 (100), LLC 3.0 (7.7), RLLC 1.7 (1.6), ILLC 63.1 (77.5, a
flagged 14.4-point gap; ILLC runs DEEPSEC's default 10 iterations), TMIFGSM 87.5 (91.6), UAP
35.9 (24.2, a flagged gap: the 30% stop rule), JSMA 52.2 on 500 (74.1; 72.8 with the raw
logits of DEEPSEC's first release, ``--config.model_kwargs='{"shift_by_max": false}'``); on 200:
SPSA 100 (96.8), CW2 99.5 (100), EAD 100 (98.9), BLB 100 (100; 5 minutes), OM 100 (100; mean
L2 1.07, ~13 core-hours).

Examples per attack (the first n of DEEPSEC's 1000 candidates, seed 100): 1000 for the cheap
attacks, 500 for JSMA, 200 for the costly ones (``n_examples`` below; at least 200 each).
Rerunning with the same ``--workdir`` skips finished attacks and resumes an interrupted one
(with its unfinished batches), so the run can be done in pieces.
``--config.settings=deepsec_code_mnist --config.fallback_settings=table8`` gives DEEPSEC's own
commands (BPDA and SPSA from Table VIII).
"""

from advtrace._src.attacks import catalog
from advtrace._src.attacks import runner

# Examples per attack; the costly ones get fewer (see the runtime estimate above).
N_EXAMPLES = {
    "fgsm": 1000, "rfgsm": 1000, "bim": 1000, "pgd": 1000, "umifgsm": 1000, "uap": 1000,
    "deepfool": 1000, "om": 200, "bpda": 1000, "spsa": 200, "llc": 1000, "rllc": 1000,
    "illc": 1000, "tmifgsm": 1000, "jsma": 500, "blb": 200, "cw2": 200, "ead": 200,
}

# On a CPU one OptMargin example is already 20 model inputs, so a larger batch only adds
# finished examples to each step (``benchmarks/gathering.py``). On a GPU pass
# ``--config.batch_sizes.om=100``.
BATCH_SIZES = {"om": 1}


def get_config():
  config = runner.default_reproduce_config()
  config.attacks = catalog.DEEPSEC_ATTACKS
  config.settings = "table7_mnist"
  config.model = "deepsec_mnist"
  config.weights = "../shared/weights/deepsec/MNIST_raw.pt"
  config.dataset = "mnist"
  config.paper_column = "mnist"
  config.n_examples.update(N_EXAMPLES)
  config.batch_sizes.update(BATCH_SIZES)
  return config
