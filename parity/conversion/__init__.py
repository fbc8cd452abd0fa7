"""Weights between PyTorch state dicts and Flax trees: one rule over names, checked once where they enter."""
