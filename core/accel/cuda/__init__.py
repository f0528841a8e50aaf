"""The CUDA fast decode path of the transformers backend and its Triton ops.

* :mod:`.fast_path`: static KV cache, compiled decode step replayed as a CUDA
  graph, sampling on the device (the backend reaches it through
  :func:`core.accel.cuda_generate` and :func:`core.accel.cuda_release`);
* :mod:`.gemv`, :mod:`.rope_store`, :mod:`.decode_attention`: the decode
  step's Triton ops (``torch.library`` ops ``gemma_local::*``), each with its
  availability check and plain-torch reference; their kernels live in
  :mod:`._gemv_triton`, :mod:`._rope_store_triton` and
  :mod:`._decode_attention_triton`, what the ops share in :mod:`._triton_ops`.

Importing any of these but the ``_*_triton`` modules imports neither torch
nor triton.
"""
