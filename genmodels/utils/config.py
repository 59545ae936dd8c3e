"""Record the constructor arguments of a module so it can be rebuilt from a checkpoint.

``ConfigMixin`` (like diffusers' ``register_to_config``, but automatic) stores the
arguments a subclass was built with in ``self.config`` as
``{"class_path": "pkg.mod.Class", "init_args": {...}}`` -- the same layout
LightningCLI / jsonargparse use in YAML, so ``instantiate(module.config)`` builds an
identical module (weights aside).
"""
from __future__ import annotations

import functools
import importlib
import inspect
from typing import Any


def _plain(value: Any) -> Any:
    """Turn tuples into lists and nested ConfigMixin objects into their configs."""
    if isinstance(value, ConfigMixin):
        return value.config
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


class ConfigMixin:
    """Mixin for ``nn.Module`` subclasses: ``self.config`` holds the constructor call."""

    config: dict

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "__init__" not in cls.__dict__:
            return
        init = cls.__dict__["__init__"]
        sig = inspect.signature(init)

        @functools.wraps(init)
        def wrapped(self, *args: Any, **kw: Any) -> None:
            outermost = not getattr(self, "_config_recording", False)
            if outermost:
                object.__setattr__(self, "_config_recording", True)
            try:
                init(self, *args, **kw)
            finally:
                if outermost:
                    bound = sig.bind(self, *args, **kw)
                    bound.apply_defaults()
                    init_args = {}
                    for name, value in list(bound.arguments.items())[1:]:
                        param = sig.parameters[name]
                        if param.kind is inspect.Parameter.VAR_KEYWORD:
                            init_args.update({k: _plain(v) for k, v in value.items()})
                        elif param.kind is inspect.Parameter.VAR_POSITIONAL:
                            raise TypeError(f"{cls.__name__}: *args constructors cannot be recorded")
                        else:
                            init_args[name] = _plain(value)
                    object.__setattr__(self, "config", {
                        "class_path": f"{type(self).__module__}.{type(self).__qualname__}",
                        "init_args": init_args,
                    })
                    object.__setattr__(self, "_config_recording", False)

        cls.__init__ = wrapped


def import_class(class_path: str) -> type:
    module_name, _, name = class_path.rpartition(".")
    if not module_name:
        raise ValueError(f"class_path {class_path!r} must be 'package.module.ClassName'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ImportError(f"cannot import module {module_name!r} for class_path {class_path!r}: {e}") from e
    try:
        return getattr(module, name)
    except AttributeError:
        raise ImportError(f"module {module_name!r} has no class {name!r} (class_path {class_path!r})") from None


def instantiate(config: dict) -> Any:
    """Build ``{"class_path": ..., "init_args": {...}}``; nested configs are built too."""
    if not isinstance(config, dict) or "class_path" not in config:
        raise ValueError(f"expected a dict with 'class_path' (and 'init_args'), got {config!r}")
    cls = import_class(config["class_path"])
    args = {}
    for k, v in (config.get("init_args") or {}).items():
        args[k] = instantiate(v) if isinstance(v, dict) and "class_path" in v else v
    return cls(**args)


def plain(value: Any) -> Any:
    """Namespaces -> dicts, tuples -> lists: a YAML list and a Python tuple are the same value."""
    if hasattr(value, "as_dict"):
        value = value.as_dict()
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    return value


def flatten_config(config: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts / Namespaces -> ``{"a.b.c": leaf}`` (lists and tuples as lists)."""
    config = plain(config)
    if not isinstance(config, dict):
        return {prefix: config}
    out: dict[str, Any] = {}
    for k, v in config.items():
        out.update(flatten_config(v, f"{prefix}.{k}" if prefix else str(k)))
    return out
