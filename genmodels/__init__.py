"""genmodels: autoregressive image-generation paradigms under one roof.

Tokenizers (``genmodels.tokenizers``) turn images into tokens and back; generators
(``genmodels.generators``) model tokens; ``genmodels.training`` holds the Lightning
loop, ``genmodels.evaluation`` the judge. See DESIGN.md for the contracts.

Start here: ``genmodels.load(ckpt_path)`` (a ``genmodels fit`` checkpoint) or
``genmodels.from_official("var-d16", folder)`` return a ``Pipeline`` whose ``.sample(labels)``
gives images (``genmodels.pipeline``).
"""

__version__ = "0.1.0"

__all__ = ["Pipeline", "from_official", "load", "seed_for"]


def __getattr__(name: str):
    """``genmodels.load`` / ``from_official`` / ``Pipeline`` / ``seed_for`` (genmodels.pipeline),
    imported on first use so ``import genmodels`` stays light."""
    if name in __all__:
        from genmodels import pipeline
        return getattr(pipeline, name)
    raise AttributeError(f"module 'genmodels' has no attribute {name!r}")
