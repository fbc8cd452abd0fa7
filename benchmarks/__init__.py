"""Throughput and latency benchmarks of resnet_flax, resnet_torch and torchvision's ResNet."""
