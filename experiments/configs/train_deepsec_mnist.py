r"""DEEPSEC's MNIST recipe (``RawModels/train_mnist.py``) for its 4-conv + 3-FC CNN.

Command:
  TFDS_DATA_DIR=../shared/tensorflow_datasets python experiments/train.py \
      --config=experiments/configs/train_deepsec_mnist.py --workdir=/tmp/train_deepsec_mnist

Expected runtime on 2 CPU cores: about 75 minutes, estimated, not measured end to end:
  0.41 s of CPU time per training step of 100 (measured) x 540 steps x 20 epochs = 73 min,
  plus per-epoch validation.
Expected result: about 99.3% test accuracy, by analogy: the released DEEPSEC weights
  (``MNIST_raw.pt``) score 99.34% on the 10,000 test images and the paper reports 98.1%. This
  config has not been run to completion here.

Recipe: 60k training images split 54,000 / 6,000 (valid_size 0.1, NumPy shuffle seed 100);
SGD lr 0.05, momentum 0.9, Nesterov, weight decay 1e-6 (L2 added to the gradient); 20 epochs of
batch 100; no augmentation; keep the best validation epoch (ties to the later one); seed 100.

References:
  Ling et al., "DEEPSEC: A Uniform Platform for Security Analysis of Deep Learning Model",
  IEEE S&P 2019. https://github.com/ryderling/DEEPSEC
"""

from advtrace import training


def get_config():
  config = training.default_config()
  config.dataset = "mnist"
  config.valid_fraction = 0.1
  config.split_seed = 100
  config.model = "deepsec_mnist"
  config.optimizer = "sgd"
  config.learning_rate = 0.05
  config.momentum = 0.9
  config.nesterov = True
  config.weight_decay = 1e-6
  config.num_epochs = 20
  config.batch_size = 100
  config.seed = 100
  return config
