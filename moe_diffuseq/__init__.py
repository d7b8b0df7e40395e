"""MoE-DiffuSeq: long-document seq2seq text diffusion.

``from moe_diffuseq import MoEDiffuSeq``;
``MoEDiffuSeq.load_from_checkpoint(path).generate([...])``.
"""

from .lit_module import MoEDiffuSeq

__version__ = "0.1.0"
__all__ = ["MoEDiffuSeq", "__version__"]
