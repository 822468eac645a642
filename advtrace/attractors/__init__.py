"""Injected attractors (seed 003): the QIM decoder, the combined model, detection and recovery.

See ``advtrace._src.qim`` (the decoder W and its secret key), ``advtrace._src.attractors`` (the
combined model of eq. 2, F_d, F_r, M_(d,r)), ``advtrace._src.attractor_analysis`` (Figs. 5 and
7) and ``advtrace._src.attractor_experiment`` (the paper's tables).
"""

from advtrace._src.attractor_analysis import density_cosine
from advtrace._src.attractor_analysis import gradient_paths
from advtrace._src.attractor_analysis import local_density
from advtrace._src.attractor_analysis import nearest_attractors
from advtrace._src.attractor_analysis import soft_label_cosine
from advtrace._src.attractor_experiment import default_config as default_experiment_config
from advtrace._src.attractor_experiment import run as run_experiment
from advtrace._src.attractors import Calibration
from advtrace._src.attractors import attractor_logits_fn
from advtrace._src.attractors import calibrate
from advtrace._src.attractors import combine
from advtrace._src.attractors import decoder_fn
from advtrace._src.attractors import detect
from advtrace._src.attractors import detection_score
from advtrace._src.attractors import integrated_logits_fn
from advtrace._src.attractors import recover
from advtrace._src.attractors import w_statistics
from advtrace._src.attractors import weighted_sum_logits_fn
from advtrace._src.qim import QIMConfig
from advtrace._src.qim import SecretKey
from advtrace._src.qim import decode
from advtrace._src.qim import load_secret_key
from advtrace._src.qim import nearest_attractor
from advtrace._src.qim import new_secret_key
from advtrace._src.qim import save_secret_key
