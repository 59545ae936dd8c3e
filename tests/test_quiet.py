"""genmodels.training.quiet: the messages printed on every run are silenced by exact message,
real warnings still show (including the eval-mode warning for a module that is not frozen)."""
from __future__ import annotations

import logging
import warnings

import lightning
import pytest
import torch
from torch import nn

from genmodels.training.quiet import ignore_frozen_eval_modules, silence_known_noise


def test_known_noise_is_silenced_and_other_warnings_show(caplog):
    silence_known_noise()
    silence_known_noise()  # idempotent
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        silence_known_noise()  # re-installed inside the catch (filters are reset by simplefilter)
        warnings.warn("`isinstance(treespec, LeafSpec)` is deprecated, use `isinstance(treespec, TreeSpec) and "
                      "treespec.is_leaf()` instead.", FutureWarning)
        warnings.warn("Starting from v1.9.0, `tensorboardX` has been removed as a dependency of the "
                      "`lightning.pytorch` package, due to potential conflicts", UserWarning)
        warnings.warn("`isinstance(x, Foo)` is deprecated", FutureWarning)
        warnings.warn("tensorboardX logging failed", UserWarning)
    assert [str(w.message) for w in seen] == ["`isinstance(x, Foo)` is deprecated", "tensorboardX logging failed"]
    from lightning.pytorch.utilities.rank_zero import rank_zero_info
    with caplog.at_level(logging.INFO):
        rank_zero_info("💡 Tip: For seamless cloud logging and experiment tracking, try installing [litlogger](x)")
        rank_zero_info("an info line")
    assert "litlogger" not in caplog.text and "an info line" in caplog.text


class Frozen(lightning.LightningModule):
    def __init__(self, freeze_head: bool = False) -> None:
        super().__init__()
        self.tokenizer = nn.Sequential(nn.Linear(2, 2), nn.ReLU()).eval()
        self.head = nn.Linear(2, 1)
        if freeze_head:
            self.head.eval()

    def on_fit_start(self) -> None:
        self._undo = ignore_frozen_eval_modules(self, ("tokenizer",))

    def on_train_start(self) -> None:
        self._undo()

    def training_step(self, batch, batch_idx):
        return self.head(self.tokenizer(batch[0])).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.head.parameters(), lr=0.1)


@pytest.mark.parametrize("freeze_head", [False, True])
def test_eval_mode_warning_only_for_modules_that_are_not_frozen(tmp_path, freeze_head):
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(4, 2)), batch_size=2)
    trainer = lightning.Trainer(max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                                enable_model_summary=False, default_root_dir=tmp_path, accelerator="cpu")
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        trainer.fit(Frozen(freeze_head), data)
    eval_warnings = [str(w.message) for w in seen if "in eval mode at the start of training" in str(w.message)]
    assert eval_warnings == (["Found 4 module(s) in eval mode at the start of training. This may lead to unexpected "
                              "behavior during training. If this is intentional, you can ignore this warning."]
                             if freeze_head else [])
    assert not any("module(s) in eval mode" in str(f[1].pattern if f[1] else "") for f in warnings.filters)
