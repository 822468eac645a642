r"""Any catalogue attack on any model and dataset; defaults: FGSM on the DEEPSEC MNIST CNN.

Command:
  python experiments/attack.py --config=experiments/configs/attack_default.py \
      --config.data_dir=../shared/tensorflow_datasets --workdir=/tmp/attack_fgsm

Expected runtime on 2 CPU cores: about 1 minute (measured on 2 heavily shared cores): ~15 s to
decode the 10,000 MNIST test images and run the clean forward pass, ~20 s to compile, ~10 s to
attack the 1,000 candidates (~100 examples/s).
Expected result (measured): FGSM eps 0.3 fools 79.9% (799 / 1,000) of DEEPSEC's candidates, mean
L2 of the successful examples 6.17 (Linf 0.3). seed-003 Table I (c) reports 90.4% on the whole
test set: a 10.5-point gap (see ``reproduce_deepsec_mnist.py``).

Other attacks, tables and models by override, e.g. ``--config.attack=cw2
--config.n_examples=200``, ``--config.settings=deepsec_code_mnist``,
``--config.attack_kwargs='{"eps": 0.2}'``; a model trained with ``experiments/train.py``:
``--config.model= --config.weights=/tmp/train_digits_small_cnn --config.dataset=digits
--config.n_examples=300 --config.candidate_pool=300``. Attack names:
``advtrace._src.attacks.catalog.names()``; tables: ``advtrace._src.attacks.settings.table_names()``.
Field meanings: :func:`advtrace._src.attacks.runner.default_config`.
"""

from advtrace._src.attacks import runner


def get_config():
  return runner.default_config()
