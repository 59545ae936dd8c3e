"""Generators over tokens (see ``base.py`` for the contract)."""
from genmodels.generators.base import Generator
from genmodels.generators.causal_ar import CausalAR
from genmodels.generators.maskgit import MaskGIT

__all__ = ["CausalAR", "Generator", "MaskGIT"]
