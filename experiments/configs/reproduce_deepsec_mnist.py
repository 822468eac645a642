r"""seed-003's 18 attacks on the DEEPSEC MNIST CNN with Table VII settings, beside Table I (c).

Command:
  python experiments/reproduce_attacks.py \
      --config=experiments/configs/reproduce_deepsec_mnist.py \
      --config.data_dir=../shared/tensorflow_datasets --workdir=/tmp/reproduce_deepsec_mnist

Expected runtime on 2 CPU cores: RUNTIME_REPRO_MNIST
Expected result: RESULT_REPRO_MNIST

Examples per attack (the first n of DEEPSEC's 1000 candidates, seed 100): 1000 for the cheap
attacks, fewer for the costly ones (``n_examples`` below; at least 200 each). Rerunning with the
same ``--workdir`` skips finished attacks and resumes an interrupted one, so the run can be done
in pieces. ``--config.settings=deepsec_code_mnist --config.fallback_settings=table8`` gives
DEEPSEC's own commands (BPDA and SPSA from Table VIII).
"""

from advtrace._src.attacks import catalog, runner

# Examples per attack; the costly ones get fewer (see the runtime estimate above).
N_EXAMPLES = {
    "fgsm": 1000, "rfgsm": 1000, "bim": 1000, "pgd": 1000, "umifgsm": 1000, "uap": 1000,
    "deepfool": 1000, "om": 200, "bpda": 1000, "spsa": 200, "llc": 1000, "rllc": 1000,
    "illc": 1000, "tmifgsm": 1000, "jsma": 500, "blb": 200, "cw2": 200, "ead": 200,
}


def get_config():
  config = runner.default_reproduce_config()
  config.attacks = catalog.DEEPSEC_ATTACKS
  config.settings = "table7_mnist"
  config.model = "deepsec_mnist"
  config.weights = "../shared/weights/deepsec/MNIST_raw.pt"
  config.dataset = "mnist"
  config.paper_column = "mnist"
  config.n_examples.update(N_EXAMPLES)
  return config
