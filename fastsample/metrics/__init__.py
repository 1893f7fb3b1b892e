"""Sample-quality metrics: feature extractors, streaming float64 statistics, FID / IS / KID / PR, and
reference statistics files.

Typical use::

    extractor = CleanFIDInception()            # or ClassifierFeatures(classifier) for MNIST-like data
    ref = load_reference("cifar10-train.npz")
    check_compatible(ref, extractor)
    stats = extract(extractor, samples, batch_size=250, keep_logits=50_000)
    fid = frechet_distance(stats.mu, stats.sigma, ref.mu, ref.sigma)
    is_mean, is_std = inception_score(stats.logits)
"""

from fastsample.metrics.features import (
    INCEPTION_ENV,
    INCEPTION_FILE,
    ClassifierFeatures,
    CleanFIDInception,
    FeatureExtractor,
    ModuleFeatures,
    extract,
    iter_batches,
    module_hash,
)
from fastsample.metrics.reference import ReferenceStats, check_compatible, load_reference, save_reference
from fastsample.metrics.scores import frechet_distance, inception_score, kid, mmd2_unbiased, precision_recall
from fastsample.metrics.stats import FeatureStats

__all__ = [
    "INCEPTION_ENV",
    "INCEPTION_FILE",
    "ClassifierFeatures",
    "CleanFIDInception",
    "FeatureExtractor",
    "FeatureStats",
    "ModuleFeatures",
    "ReferenceStats",
    "check_compatible",
    "extract",
    "frechet_distance",
    "inception_score",
    "iter_batches",
    "kid",
    "load_reference",
    "mmd2_unbiased",
    "module_hash",
    "precision_recall",
    "save_reference",
]
