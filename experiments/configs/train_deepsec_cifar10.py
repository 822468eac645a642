r"""DEEPSEC's CIFAR-10 recipe (``RawModels/train_cifar10.py``) for its ResNet-20.

Command:
  TFDS_DATA_DIR=../shared/tensorflow_datasets python experiments/train.py \
      --config=experiments/configs/train_deepsec_cifar10.py --workdir=/tmp/train_deepsec_cifar10

Expected runtime on 2 CPU cores: about 26 hours, estimated, not measured end to end:
  0.33 s of CPU time per training step of 32 (measured on random data) x 1,407 steps x 200
  epochs; a GPU is the practical choice.
Expected result: about 90% test accuracy, the paper's figure (90.1%). Unverified:
  CIFAR-10 is not available to this project.

Needs the tfds CIFAR-10 (array_record), prepared once with internet access (see README).

Recipe: 50k training images split 45,000 / 5,000 (seed 100); Adam lr 1e-3; 200 epochs of batch
32 (1,407 steps per epoch, the last batch partial); the learning rate is multiplied by 0.1 after
0-based epochs 80, 120 and 160 and by 0.5 after epoch 180, with a floor of 5e-7 (DEEPSEC calls
``adjust_learning_rate(epoch)`` after each epoch); RandomAffine(translate=0.1) + horizontal flip
augmentation; keep the best validation epoch (ties to the later one); seed 100.

References:
  Ling et al., "DEEPSEC: A Uniform Platform for Security Analysis of Deep Learning Model",
  IEEE S&P 2019. https://github.com/ryderling/DEEPSEC
"""

from advtrace import training


def get_config():
  config = training.default_config()
  config.dataset = "cifar10"
  config.valid_fraction = 0.1
  config.split_seed = 100
  config.model = "deepsec_resnet20"
  config.optimizer = "adam"
  config.learning_rate = 1e-3
  config.weight_decay = 0.0
  config.lr_schedule = "piecewise"
  config.lr_boundaries_epochs = (80, 120, 160, 180)
  config.lr_scales = (0.1, 0.1, 0.1, 0.5)
  config.lr_floor = 5e-7
  config.augment = "translate_flip"
  config.translate = 0.1
  config.num_epochs = 200
  config.batch_size = 32
  config.seed = 100
  config.log_every_steps = 500
  return config
