"""The judge: one harness for every paradigm (DESIGN.md, "Evaluation").

``Evaluator`` generates N class-balanced samples, extracts features with a pluggable
network (``digits-classifier``, ``inception``, or any module) and computes FID, IS,
precision and recall against cached reference features (or an ADM reference batch),
then writes a results row. See ``evaluator.py`` for the protocol.
"""
from genmodels.evaluation.evaluator import Evaluator, FeatureBank, config_files_from_argv
from genmodels.evaluation.features import (DigitsClassifierFeatures, FeatureExtractor, InceptionFeatures,
                                           ModuleFeatures, build_feature_extractor)
from genmodels.evaluation.metrics import (feature_statistics, frechet_distance, inception_score, manifold_radii,
                                          precision_recall)
from genmodels.evaluation.reference import Reference, read_adm_npz, write_adm_npz
from genmodels.evaluation.results import append_results_row, read_rows

__all__ = [
    "DigitsClassifierFeatures", "Evaluator", "FeatureBank", "FeatureExtractor", "InceptionFeatures", "ModuleFeatures",
    "Reference", "append_results_row", "build_feature_extractor", "config_files_from_argv", "feature_statistics",
    "frechet_distance", "inception_score", "manifold_radii", "precision_recall", "read_adm_npz", "read_rows",
    "write_adm_npz",
]
