"""depthlab.models: pure Flax (linen) module definitions. A model file knows nothing of training.

Example:
    >>> from depthlab.models import get_model, model_names
    >>> model = get_model("cnn", num_classes=10)

PyTorch weights (torchvision ResNets, Hugging Face GPT-2) load through `depthlab.models.pretrained`;
the conventions that differ from PyTorch, and the options that follow PyTorch, are in docs/pytorch.md.
"""
from depthlab.models.registry import get_model, model_names, register_model

# One import line per model module (each registers its classes by name).
from depthlab.models.mlp import MLP
from depthlab.models.cnn import CNN
from depthlab.models.resnet import ResNet
from depthlab.models.rl import ActorCritic, PolicyValueNet
from depthlab.models.recurrent import RNNClassifier, RNNLanguageModel
from depthlab.models.transformer import BERT, GPT, EncoderDecoder, generate
from depthlab.models.norm import BatchNorm
from depthlab.models.vae import ConvVAE, MLPVAE
from depthlab.models.gan import DCGANDiscriminator, DCGANGenerator, MLPDiscriminator, MLPGenerator
from depthlab.models.detection import Detector
from depthlab.models.unet import UNet
from depthlab.models.quantized import QuantCNN, QuantConv, QuantDense
from depthlab.models.spiking import LIFCell, SpikingMLP
from depthlab.models.options import REMAT_POLICIES, stack_layer_params, unstack_layer_params
