"""Lightning training loop: one module for tokenizers, one for generators."""
from genmodels.training.generator_module import GeneratorModule
from genmodels.training.quiet import silence_known_noise
from genmodels.training.tokenizer_module import TokenizerModule

silence_known_noise()

__all__ = ["GeneratorModule", "TokenizerModule"]
