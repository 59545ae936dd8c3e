"""The judge: one harness for every paradigm (DESIGN.md, "Evaluation").

Split by job:

* ``reference.py``  -- resolve the reference (ADM ``.npz`` or a data split), compute it once,
  cache it keyed by content;
* ``generation.py`` -- the sampling plan (fixed class order, round-robin blocks over ranks),
  generation + feature extraction, the one gather;
* ``features.py``   -- feature extractors (digits classifier, Inception + sFID features, DINOv2);
* ``metrics.py``    -- FID, sFID, IS, precision / recall (ADM arithmetic);
* ``protocol.py``   -- the rules behind each number, comparability with the papers;
* ``results.py``    -- results rows (``.jsonl`` + ``.csv``);
* ``adm_export.py`` -- the ADM ``.npz`` format, image folders;
* ``evaluator.py``  -- ``Evaluator``: the settings and entry points tying them together.
"""
from genmodels.evaluation.adm_export import read_adm_npz, write_adm_npz
from genmodels.evaluation.evaluator import Evaluator
from genmodels.evaluation.features import (DigitsClassifierFeatures, DINOv2Features, Extracted, FeatureExtractor,
                                           InceptionFeatures, ModuleFeatures, build_feature_extractor)
from genmodels.evaluation.generation import SamplingPlan, generate_and_extract
from genmodels.evaluation.metrics import (feature_statistics, frechet_distance, inception_score, manifold_radii,
                                          precision_recall)
from genmodels.evaluation.protocol import Rules, paper_protocol_gaps
from genmodels.evaluation.reference import Reference
from genmodels.evaluation.results import append_results_row, read_rows

__all__ = [
    "DINOv2Features", "DigitsClassifierFeatures", "Evaluator", "Extracted", "FeatureExtractor", "InceptionFeatures",
    "ModuleFeatures", "Reference", "Rules", "SamplingPlan", "append_results_row",
    "build_feature_extractor", "feature_statistics", "frechet_distance", "generate_and_extract", "inception_score",
    "manifold_radii", "paper_protocol_gaps", "precision_recall", "read_adm_npz", "read_rows", "write_adm_npz",
]
