"""LoRA on the merge engine (issue 13, first slice): extract a LoRA from two checkpoints, bake LoRAs into one.

One concept per module: ``names`` (checkpoint key <-> kohya/A1111 module name), ``svd`` (truncated SVD and rank
choice), ``files`` (reading and writing LoRA safetensors), ``writer`` (a streamed safetensors sink),
``blocks`` (LoRA block weights: presets and 12/17/20/26-value vectors), ``extract``, ``bake`` and ``merge``
(LoRAs into one LoRA).
"""
