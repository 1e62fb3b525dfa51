"""Calibration and evaluation text: named datasets (through huggingface-hub), local files, the offline pydocs
corpus, and deterministic token samples for calibration."""

from llmq.calib.samples import calibration_samples
from llmq.calib.sources import load_documents, load_text, registered, resolve_source

__all__ = ["calibration_samples", "load_documents", "load_text", "registered", "resolve_source"]
