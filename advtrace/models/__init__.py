"""Models: the registry, the DEEPSEC victim models, the model zoo, and weight loading."""

from advtrace._src.models.deepsec import DeepSecMNISTCNN  # noqa: I001  (one symbol per line)
from advtrace._src.models.deepsec import DeepSecResNet20
from advtrace._src.models.deepsec_weights import load_deepsec
from advtrace._src.models.registry import LogitsFn
from advtrace._src.models.registry import get_model
from advtrace._src.models.registry import init_variables
from advtrace._src.models.registry import list_models
from advtrace._src.models.registry import logits_fn
from advtrace._src.models.registry import register
from advtrace._src.models.registry import split
from advtrace._src.models.zoo import AlexNet
from advtrace._src.models.zoo import ResNet18
from advtrace._src.models.zoo import ResNet50
from advtrace._src.models.zoo import SmallCNN
from advtrace._src.models.zoo import VGG16
from advtrace._src.models.zoo import VGG16BN
from advtrace._src.weights import load_weights

__all__ = (
    "AlexNet",
    "DeepSecMNISTCNN",
    "DeepSecResNet20",
    "LogitsFn",
    "ResNet18",
    "ResNet50",
    "SmallCNN",
    "VGG16",
    "VGG16BN",
    "get_model",
    "init_variables",
    "list_models",
    "load_deepsec",
    "load_weights",
    "logits_fn",
    "register",
    "split",
)
