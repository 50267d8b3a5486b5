"""Data sources, datasets and batching."""

from vlmkit.data import easyvqa  # noqa: F401  (registers the easy-VQA source)
from vlmkit.data.dataset import Collator, ConversationDataset, GlobalBatchSampler, load_source
from vlmkit.data.sources import SOURCES, DataError, Sample, SourceResult, iter_texts

__all__ = ["SOURCES", "Collator", "ConversationDataset", "DataError", "GlobalBatchSampler", "Sample", "SourceResult", "iter_texts", "load_source"]
