"""The compiled AR decode step before and after bf25016 (the last-layer change), instruction by
instruction (names and debug metadata stripped): the change must leave the AR loop as it was.

  PYTHONPATH=. .venv/bin/python results/decode_profile/ar_step_unchanged.py
"""
import re
import jax, jax.numpy as jnp
from configs import shakespeare_tiny
from kforcing_jax import models, roofline, decode
from kforcing_jax.models import backbone as bb, attention
c = shakespeare_tiny.get_config()
m = models.teacher(c)

def hlo(B):
  cache = jax.eval_shape(lambda: decode.init_cache(m.cfg, B, 128))
  args = (m.param_shapes, cache, jax.ShapeDtypeStruct((B, 1), jnp.int32),
          jax.ShapeDtypeStruct((), jnp.int32), jax.ShapeDtypeStruct((B,), jnp.float32))
  txt = jax.jit(roofline._ar_step(m, 1.0), donate_argnums=(1,)).lower(*args).compile().as_text()
  lines = [re.sub(r', (metadata|stack_frame_id|frontend_attributes)=(\{[^}]*\}|\S+)', '', l)
           for l in txt.split('\n') if ' = ' in l]
  return [re.sub(r'(%[A-Za-z_\-]+)[.]\d+', r'\1', re.sub(r'region_\d+[.]\d+', 'region', l)) for l in lines]

def old_window_layer(self, layer, x, positions, ctx_k, ctx_v, ctx_len, outputs_from=0):
  block = self.blocks[layer]
  q, k, v = block.project_qkv(x, positions)
  scale = q.shape[-1] ** -0.5
  num_ctx, width = ctx_k.shape[2], q.shape[2]
  ctx_scores = jnp.einsum('btwhd,bhsd->bhtws', q, ctx_k, preferred_element_type=jnp.float32) * scale
  visible = jnp.arange(num_ctx) < jnp.broadcast_to(ctx_len, q.shape[:2])[:, None, :, None, None]
  ctx_scores = jnp.where(visible, ctx_scores, attention.NEG_INF)
  own_scores = jnp.einsum('btwhd,btxhd->bhtwx', q, k, preferred_element_type=jnp.float32) * scale
  own_scores = jnp.where(jnp.tril(jnp.ones((width, width), dtype=bool)), own_scores, attention.NEG_INF)
  probs = jax.nn.softmax(jnp.concatenate([ctx_scores, own_scores], axis=-1), axis=-1).astype(v.dtype)
  ctx_probs, own_probs = probs[..., :num_ctx], probs[..., num_ctx:]
  attn = (jnp.einsum('bhtws,bhsd->btwhd', ctx_probs, ctx_v)
          + jnp.einsum('bhtwx,btxhd->btwhd', own_probs, v))
  return block.finish(x, attn), (k, v)

new = {B: hlo(B) for B in (1, 16, 256)}
bb.Backbone.window_layer = old_window_layer
old = {B: hlo(B) for B in (1, 16, 256)}
for B in (1, 16, 256):
  diff = [(a, b) for a, b in zip(old[B], new[B]) if a != b]
  print(f'B={B}: {len(new[B])} instructions after, {len(old[B])} before; differing: {len(diff)}')
  for a, b in diff[:3]:
    print('  before:', a[:160]); print('  after: ', b[:160])
