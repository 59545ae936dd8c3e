from genmodels.utils.config import ConfigMixin, instantiate

__all__ = ["ConfigMixin", "instantiate"]
