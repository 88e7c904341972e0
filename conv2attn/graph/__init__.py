"""The ONNX graph pass (onnx, onnx-graphsurgeon).

``rewrite`` runs the stages; ``shapes``, ``constants``, ``select``, ``emit`` and ``verify``
are one stage each, and ``options`` holds what the pass is asked to do. Import
``conv2attn.graph.rewrite`` (or ``conv2attn.convert``) to convert; this package's own
import is empty so that reading one stage does not load the others.
"""
