from genmodels.nn.adaln import modulate
from genmodels.nn.attention import Attention, Block, KVCache, Mlp

__all__ = ["Attention", "Block", "KVCache", "Mlp", "modulate"]
