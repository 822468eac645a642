"""Checks of the gap hypotheses in attacks_deepsec_mnist.md (about 40 s on 2 CPU cores).

Run after the reproduction (it reads the ILLC candidates from its workdir):
  TFDS_DATA_DIR=../shared/tensorflow_datasets python docs/results/gap_checks_deepsec_mnist.py
"""

import numpy as np

from advtrace import attacks
from advtrace import data
from advtrace import models
from advtrace._src import batching

WORKDIR = "workdirs/reproduce_deepsec_mnist"


def main():
  name, variables = models.load_deepsec("../shared/weights/deepsec/MNIST_raw.pt")
  f = models.logits_fn(models.get_model(name), variables)
  test = data.load("mnist", "test")
  success = [np.asarray(attacks.fgsm(f, b.x, b.y, eps=0.3).info.success)[b.mask]
             for b in batching.padded_batches(test.images, test.labels, 500)]
  print(f"FGSM eps 0.3, all 10000 test images: ASR {100 * np.concatenate(success).mean():.1f}%")
  illc = np.load(f"{WORKDIR}/illc/adversarial.npz")
  for steps in (10, 15, 20):
    success = [np.asarray(attacks.bim(f, b.x, b.y, eps=0.3, step_size=0.05, num_steps=steps,
                                      targeted=True).info.success)[b.mask]
               for b in batching.padded_batches(illc["x"], illc["target"], 500)]
    print(f"ILLC eps 0.3 step 0.05, {steps} iterations, same candidates: "
          f"ASR {100 * np.concatenate(success).mean():.1f}%")


if __name__ == "__main__":
  main()
