r"""Any catalogue attack on any model and dataset; defaults: FGSM on the DEEPSEC MNIST CNN.

Command:
  python experiments/attack.py --config=experiments/configs/attack_default.py \
      --config.data_dir=../shared/tensorflow_datasets --workdir=/tmp/attack_fgsm

Expected runtime on 2 CPU cores: RUNTIME_FGSM
Expected result: RESULT_FGSM

Other attacks, tables and models by override, e.g. ``--config.attack=cw2
--config.n_examples=200``, ``--config.settings=deepsec_code_mnist``,
``--config.attack_kwargs='{"eps": 0.2}'``; a model trained with ``experiments/train.py``:
``--config.model= --config.weights=/tmp/train_digits_small_cnn --config.dataset=digits
--config.candidate_pool=300``. Attack names: ``advtrace._src.attacks.catalog.names()``; tables:
``advtrace._src.attacks.settings.table_names()``. Field meanings:
:func:`advtrace._src.attacks.runner.default_config`.
"""

from advtrace._src.attacks import runner


def get_config():
  return runner.default_config()
