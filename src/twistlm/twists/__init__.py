"""Twists ψ_t: look-ahead values that shape intermediate targets and the twist-induced proposal."""

from twistlm.twists.base import Twist, TwistContext
from twistlm.twists.linear import LinearTwist

__all__ = ["LinearTwist", "Twist", "TwistContext"]
