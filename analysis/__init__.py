"""Model-agnostic representation analysis for vision transformers."""
