"""Lightning training loop: one module for tokenizers, one for generators."""
from genmodels.training.generator_module import GeneratorModule
from genmodels.training.tokenizer_module import TokenizerModule

__all__ = ["GeneratorModule", "TokenizerModule"]
