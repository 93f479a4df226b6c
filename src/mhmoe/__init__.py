"""mhmoe: Multi-Head Mixture-of-Experts (Huang, Wu, Ma, Wei; arXiv 2411.16205).

    y = merge( unsplit( MoE( split( head(x), h ) ) ) )

The layer family (Dense, SMoE, fine-grained SMoE, MH-MoE, shared experts, head/merge
ablations) shares one MoE core; ``mhmoe.planning`` counts their parameters and FLOPs and plans
FLOPs-matched MH-MoE configurations.
"""

# Registers the config and model with transformers' Auto classes once transformers is imported
# (an import hook: `import mhmoe` never imports transformers itself, and works without it).
from mhmoe import hf as _hf  # noqa: F401,E402
from mhmoe.config import DenseConfig, MoEConfig
from mhmoe.layers.feed_forward import FeedForward
from mhmoe.layers.mh_moe import MHMoE, MoE, build_ffn
from mhmoe.layers.moe import MoEAux
from mhmoe.version import __version__  # noqa: F401 (mhmoe.__version__)

__all__ = [
    "DenseConfig",
    "FeedForward",
    "MHMoE",
    "MoE",
    "MoEAux",
    "MoEConfig",
    "build_ffn",
]
