"""Benchmark scripts: each writes a JSON result (and a plot) to a path given by a flag.

  hf_generate   HF transformers `generate` (PyTorch, CPU) vs our jitted `decode.generate_ar`,
                same architecture size, same batch sizes and lengths, one process.
"""
