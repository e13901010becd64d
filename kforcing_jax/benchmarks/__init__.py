"""Benchmark scripts: each writes a JSON result (and a plot) to a path given by a flag.

  decode_speed  random-weight AR and k-token decoders of a config, interleaved, speed-up per
                batch size (decode.decoder + timing.measure_throughput).
  hf_generate   HF transformers `generate` (PyTorch, CPU) vs our jitted `decode.generate_ar`,
                same architecture size, same batch sizes and lengths, one process.
"""
