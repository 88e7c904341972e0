"""The construction itself: what a Conv becomes, independent of any file format.

``geometry`` (plain Python) lays out the patch tokens, heads and costs of one Conv;
``planning`` chooses a plan per Conv for a whole model; ``weights`` (numpy) builds the
projection and the attention pattern; ``selection`` decides which Convs a user asked for.
Nothing here imports onnx or torch: the ONNX pass (``conv2attn.graph``) and the PyTorch
layer (``conv2attn.trainable``) are both built on it. The design is in ``docs/design.md``.
"""
