"""URSAMLib: the UR-SAM engine (no Slicer, no Qt).

Modules, in the order data flows through them (METHOD.md):
``boxes`` (3D boxes), ``prompt_augmentation``, ``sam_backend``, ``uncertainty``
(ensemble and entropy), ``rectification`` (Algorithm 1), ``baselines``
(FPC/FNC/FPNC), ``metrics``; ``pipeline`` runs them per slice, ``segment``
per scan, ``cli`` is the ``ursam`` command.
"""
__version__ = "0.1.0"
