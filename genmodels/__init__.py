"""genmodels: autoregressive image-generation paradigms under one roof.

Tokenizers (``genmodels.tokenizers``) turn images into tokens and back; generators
(``genmodels.generators``) model tokens; ``genmodels.training`` holds the Lightning
loop, ``genmodels.evaluation`` the judge. See DESIGN.md for the contracts.
"""

__version__ = "0.1.0"
