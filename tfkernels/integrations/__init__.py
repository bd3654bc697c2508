"""Bridges from other libraries to tfkernels' ops.

Each integration is its own module and imports its library only when imported itself, so
``import tfkernels`` never imports them:

- ``tfkernels.integrations.hf`` (Hugging Face transformers, the ``hf`` extra) registers
  ``tk.attention`` as an attention backend;
- ``tfkernels.integrations.diffusers`` (the ``diffusers`` extra) gives a diffusers model's attention
  modules processors that run ``tk.attention``;
- ``tfkernels.integrations.torchtitan`` makes ``tk.attention`` torchtitan's inner attention, with
  packed-document and Transfusion masks.
"""
