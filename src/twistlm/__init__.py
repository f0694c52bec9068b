"""twistlm: probabilistic inference in language models.

Sample from σ(s) ∝ p0(s | x) φ(s) with SIS, SMC and twisted SMC, and measure how good the samples are.
Notation follows MATH.md (shipped in the repository's docs).
"""

from twistlm.errors import TwistLMError
from twistlm.exact import ExactTarget, OptimalTwist, enumerate_target
from twistlm.lm import HFLM, LMState, ParticleLM, load_lm
from twistlm.potentials import FunctionPotential, Potential, Sequences, as_potential, potential_from_spec
from twistlm.resampling import RESAMPLERS
from twistlm.result import SMCResult
from twistlm.smc import run_smc, sis, smc, twisted_smc
from twistlm.target import Target
from twistlm.trace import SMCTrace
from twistlm.toy import ToyLM
from twistlm.twists import LinearTwist, Twist, TwistContext

__version__ = "0.1.0"

__all__ = [
    "HFLM",
    "RESAMPLERS",
    "ExactTarget",
    "FunctionPotential",
    "LMState",
    "LinearTwist",
    "OptimalTwist",
    "ParticleLM",
    "Potential",
    "SMCResult",
    "SMCTrace",
    "Sequences",
    "Target",
    "ToyLM",
    "Twist",
    "TwistContext",
    "TwistLMError",
    "as_potential",
    "enumerate_target",
    "load_lm",
    "potential_from_spec",
    "run_smc",
    "sis",
    "smc",
    "twisted_smc",
]
