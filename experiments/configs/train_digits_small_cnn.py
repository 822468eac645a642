r"""Small CNN on scikit-learn's bundled 8x8 digits (offline, no data dir needed).

Command:
  python experiments/train.py --config=experiments/configs/train_digits_small_cnn.py \
      --workdir=/tmp/train_digits_small_cnn

Expected runtime on 2 CPU cores: about 20 s (measured 18.6 s wall including imports and
  compilation, on a shared machine under load; 13.2 s of it in train_and_evaluate).
Expected result: test accuracy 0.9889 (355 / 359) from the best validation epoch (5,
  validation accuracy 0.9720); the run is deterministic, so reruns give the same numbers.

Data: 1,438 training digits split 90/10 (seed 100) into 1,295 train / 143 validation, and 359
test digits. SGD with Nesterov momentum, as the DEEPSEC MNIST recipe, at batch size 32.
"""

from advtrace import training


def get_config():
  config = training.default_config()
  config.dataset = "digits"
  config.model = "small_cnn"
  config.optimizer = "sgd"
  config.learning_rate = 0.05
  config.momentum = 0.9
  config.nesterov = True
  config.num_epochs = 10
  config.batch_size = 32
  config.log_every_steps = 0
  return config
