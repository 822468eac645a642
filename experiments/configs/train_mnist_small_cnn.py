r"""Small CNN on MNIST: a fast real-data run.

Command:
  TFDS_DATA_DIR=../shared/tensorflow_datasets python experiments/train.py \
      --config=experiments/configs/train_mnist_small_cnn.py --workdir=/tmp/train_mnist_small_cnn

Expected runtime on 2 CPU cores: about 2-3 minutes (measured 169 s wall on a shared machine
  under heavy load; 0.079 s of CPU time per training step of 100, 540 steps per epoch).
Expected result: test accuracy 0.9832 after 2 epochs (best validation accuracy 0.9808,
  epoch 2).

Needs the tfds MNIST (array_record) in ``$TFDS_DATA_DIR`` or ``--data_dir``. Uses the DEEPSEC
54,000 / 6,000 train/validation split (seed 100) and SGD with Nesterov momentum.
"""

from advtrace import training


def get_config():
  config = training.default_config()
  config.dataset = "mnist"
  config.model = "small_cnn"
  config.optimizer = "sgd"
  config.learning_rate = 0.05
  config.momentum = 0.9
  config.nesterov = True
  config.num_epochs = 2
  config.batch_size = 100
  return config
