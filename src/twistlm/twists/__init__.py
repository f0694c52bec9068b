"""Twists ψ_t: look-ahead values that shape intermediate targets and the twist-induced proposal."""

from twistlm.twists.base import Twist, TwistContext
from twistlm.twists.conditional import ConditionalTwist
from twistlm.twists.embedding import EmbeddingTwist
from twistlm.twists.io import build_twist, load_twist, save_twist
from twistlm.twists.linear import LinearTwist
from twistlm.twists.lora import LoRATwist
from twistlm.twists.mlp import MLPTwist
from twistlm.twists.ratio import RatioTwist
from twistlm.twists.tabular import TabularTwist

__all__ = [
    "ConditionalTwist",
    "EmbeddingTwist",
    "LinearTwist",
    "LoRATwist",
    "MLPTwist",
    "RatioTwist",
    "TabularTwist",
    "Twist",
    "TwistContext",
    "build_twist",
    "load_twist",
    "save_twist",
]
