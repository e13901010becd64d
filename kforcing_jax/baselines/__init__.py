"""The decoding accelerators K-Forcing is compared with under identical conditions (issue 15).

Each trains on the same corpus and tokenizer, from the same AR teacher where its method starts
from one, with a budget set in config.compare, and decodes in a jitted loop the comparison
harness (kforcing_jax/compare.py) times beside the AR teacher and the K-Forcing students:

  speculative.py  a small AR draft model proposes k tokens, the teacher verifies them in one
                  pass (rejection sampling: lossless in distribution; or shared noise)
  heads.py        k-1 independent heads on the frozen teacher (Medusa / multi-token prediction),
                  decoded without verification and with it
  mdlm.py         a masked (absorbing-state) diffusion LM of the teacher's size, decoded with T
                  denoising steps
"""
