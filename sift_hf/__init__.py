"""SIFT and VCAS in the loops people already use: ``transformers.Trainer`` (``SiftTrainer``,
``with_sift``) and ``accelerate`` (``SiftSelector``). Optional: ``pip install sift-train[hf]``.

Supported: transformers >= 5.0, < 6; accelerate >= 1.1; BERT masked LM, GPT-2 and Llama causal LM.
The engine never imports this package.
"""

from sift_hf.arguments import SiftArguments
from sift_hf.models import UnsupportedError
from sift_hf.selector import SiftSelector
from sift_hf.trainer import SiftTrainer, with_sift

__all__ = ["SiftArguments", "SiftSelector", "SiftTrainer", "UnsupportedError", "with_sift"]
