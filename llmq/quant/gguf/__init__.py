"""The GGUF family: ggml-exact block encoders, scale searches, llama.cpp mixes, importance matrices, worker
processes and the ``gguf`` quantizer."""
