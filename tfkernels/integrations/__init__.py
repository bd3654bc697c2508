"""Bridges from other libraries to tfkernels' ops.

Each integration is its own module and imports its library only when imported itself, so
``import tfkernels`` never imports them: ``tfkernels.integrations.hf`` (Hugging Face transformers,
the ``hf`` extra) registers ``tk.attention`` as an attention backend.
"""
