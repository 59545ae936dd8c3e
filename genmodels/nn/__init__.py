from genmodels.nn.adaln import modulate
from genmodels.nn.attention import Attention, Block, DropPath, KVCache, Mlp

__all__ = ["Attention", "Block", "DropPath", "KVCache", "Mlp", "modulate"]
