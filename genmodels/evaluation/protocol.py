"""The rules behind each number, and whether a row is comparable with the papers' tables.

The ADM protocol (openai/guided-diffusion ``evaluations/evaluator.py``; the ImageNet-256 tables
of VAR, MAR, TiTok, FractalGen): 50,000 samples, exactly 50 per class in a fixed class order,
rounded to uint8 as PNGs store them; torch-fidelity's TF-ported Inception-v3; FID / sFID
against the reference batch's stored ``mu``/``sigma`` and ``mu_s``/``sigma_s``; IS with split
size 5,000; precision/recall with k = 3 against the batch's 10,000 images, float16 distance
blocks with a float32 fallback per block. ``paper_protocol_gaps`` lists every way a run
differs; a row with any gap has ``comparable_with_papers: false`` and the gaps.
"""
from __future__ import annotations

from dataclasses import dataclass

from genmodels.errors import GenmodelsError
from genmodels.evaluation.metrics import ADM_IS_SPLIT_SIZE, ADM_PR_BLOCK, PR_ARITHMETICS, is_rule_name

ADM_NUM_SAMPLES = 50_000
ADM_NUM_REFERENCE = 10_000
ADM_NHOOD = 3
ADM_EXTRACTOR = "inception-v3-compat"


@dataclass(frozen=True)
class Rules:
    """How the numbers are computed: IS split rule, P/R arithmetic and block, k."""

    is_split_size: int | None = ADM_IS_SPLIT_SIZE
    is_splits: int | None = None
    pr_arithmetic: str = "adm-fp16"
    pr_block: int = ADM_PR_BLOCK
    nhood_size: int = ADM_NHOOD

    def __post_init__(self) -> None:
        if (self.is_split_size is None) == (self.is_splits is None):
            raise GenmodelsError("evaluator: give exactly one of is_split_size (ADM: 5000) or is_splits (e.g. 10)")
        if self.pr_arithmetic not in PR_ARITHMETICS:
            raise GenmodelsError(f"evaluator.pr_arithmetic: {self.pr_arithmetic!r} is not one of {PR_ARITHMETICS}")

    @classmethod
    def named(cls, protocol: str) -> "Rules":
        """``"adm"``: split size 5,000, float16 blocks + float32 fallback; ``"fp32"``: 10 equal
        IS splits, float32 distances."""
        if protocol == "adm":
            return cls()
        if protocol == "fp32":
            return cls(is_split_size=None, is_splits=10, pr_arithmetic="fp32")
        raise GenmodelsError(f"evaluator.protocol: {protocol!r} is not 'adm' or 'fp32'")

    @property
    def is_rule(self) -> str:
        return is_rule_name(self.is_split_size, self.is_splits)

    def describe(self) -> dict[str, str | int]:
        return {"is_rule": self.is_rule, "pr_arithmetic": self.pr_arithmetic, "pr_block": self.pr_block,
                "nhood_size": self.nhood_size}


def paper_protocol_gaps(*, num_samples: int, per_class: list[int] | None, rules: Rules, num_reference: int | None,
                        extractor: str, stored_statistics: bool, uint8: bool = True,
                        num_classes: int | None = None) -> list[str]:
    """Every way a run differs from the ADM protocol (empty: comparable with the papers)."""
    gaps = []
    if num_samples != ADM_NUM_SAMPLES:
        gaps.append(f"num_samples={num_samples} (ADM: {ADM_NUM_SAMPLES})")
    if per_class is None:
        gaps.append("class balance unknown (no labels)")
    elif len(set(per_class)) > 1:
        gaps.append(f"classes not balanced ({min(per_class)}..{max(per_class)} per class)")
    elif (num_classes or len(per_class)) == 1000 and per_class[0] != ADM_NUM_SAMPLES // 1000:
        gaps.append(f"{per_class[0]} per class (ADM: 50)")
    if rules.is_split_size != ADM_IS_SPLIT_SIZE:
        gaps.append(f"IS {rules.is_rule} (ADM: split_size={ADM_IS_SPLIT_SIZE})")
    if rules.nhood_size != ADM_NHOOD:
        gaps.append(f"k={rules.nhood_size} (ADM: 3)")
    if rules.pr_arithmetic != "adm-fp16" or rules.pr_block != ADM_PR_BLOCK:
        gaps.append(f"P/R {rules.pr_arithmetic} blocks of {rules.pr_block} (ADM: adm-fp16, {ADM_PR_BLOCK})")
    if num_reference != ADM_NUM_REFERENCE:
        gaps.append(f"P/R reference of {num_reference} images (ADM: {ADM_NUM_REFERENCE})")
    if extractor != ADM_EXTRACTOR:
        gaps.append(f"extractor {extractor} (ADM: {ADM_EXTRACTOR})")
    if not stored_statistics:
        gaps.append("FID statistics recomputed (ADM: the reference batch's stored mu/sigma)")
    if not uint8:
        gaps.append("samples not rounded to uint8")
    return gaps
