"""Parity checks: the same weights in resnet_torch and resnet_flax must compute the same function."""
