"""Image folders streamed through Grain with the ResNet ImageNet transforms, in uint8, framework-free.

``folders`` lists an image folder (one subfolder per class), ``images`` decodes one file to RGB,
``transforms`` holds torchvision's RandomResizedCrop and resize + centre crop on PIL images, and
``pipeline`` builds the Grain datasets that run them in worker processes. Nothing here imports
torch, jax or the trainer; normalisation happens on the device, in the trainer's step.
"""
