"""Offline training for the MIDOG 2025 atypical-mitosis classifier: data, folds, LoRA, export to ONNX."""
