"""The decoder: one class for every family, configured by ModelConfig.

Layers are stacked (every parameter has a leading layer axis) and run under `jax.lax.scan`, so compile
time does not grow with depth. A scan step covers `cfg.layer_period` layers: phi-3-small alternates
block-sparse and dense attention, so its step is a (sparse, dense) pair with the pattern fixed at trace
time.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from phi3_jax import sharding as shd
from phi3_jax.model.attention import Attention
from phi3_jax.model.config import ModelConfig
from phi3_jax.model.layers import MLP, Embed, Linear, Norm, dtype_of, rope_tables


class Block(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.input_layernorm = Norm(cfg, rngs)
        self.self_attn = Attention(cfg, rngs)
        self.post_attention_layernorm = Norm(cfg, rngs)
        self.mlp = MLP(cfg, rngs)

    def __call__(self, x_BTD, cos_BTH, sin_BTH, segment_ids_BT, layout, impl):
        # Residual stream pinned at the sublayer boundaries (no-op outside shd.activation_sharding).
        x_BTD = shd.constrain(x_BTD, shd.ACT_BTD)
        x_BTD = x_BTD + self.self_attn(self.input_layernorm(x_BTD), cos_BTH, sin_BTH,
                                       segment_ids_BT=segment_ids_BT, layout=layout, impl=impl)
        x_BTD = shd.constrain(x_BTD, shd.ACT_BTD)
        x_BTD = x_BTD + self.mlp(self.post_attention_layernorm(x_BTD))
        return shd.constrain(x_BTD, shd.ACT_BTD)


def _stacked_blocks(cfg: ModelConfig, rngs: nnx.Rngs) -> Block:
    @nnx.split_rngs(splits=cfg.num_layers)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def make(r: nnx.Rngs) -> Block:
        return Block(cfg, r)

    return make(rngs)


def blocksparse_layout(cfg: ModelConfig):
    from pallas_kernels.blocksparse import Layout

    return Layout(block_size=cfg.blocksparse_block_size, local_blocks=cfg.blocksparse_local_blocks,
                  vert_stride=cfg.blocksparse_vert_stride, num_heads=cfg.num_heads,
                  homo_head=cfg.blocksparse_homo_head)


_REMAT_POLICIES = {
    "full": None,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


class Decoder(nnx.Module):
    """Phi-3 decoder. `model(input_ids)` -> float32 logits [B, T, vocab]."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.embed_tokens = Embed(cfg, rngs)
        self.layers = _stacked_blocks(cfg, rngs)
        self.norm = Norm(cfg, rngs)
        self.lm_head = (None if cfg.tie_embeddings
                        else Linear(cfg.hidden_size, cfg.vocab_size, bias=False, cfg=cfg, rngs=rngs))

    def __call__(self, input_ids_BT, *, positions_BT=None, segment_ids_BT=None, impl: str | None = None):
        input_ids_BT = jnp.asarray(input_ids_BT)
        if input_ids_BT.ndim != 2 or not jnp.issubdtype(input_ids_BT.dtype, jnp.integer):
            raise ValueError(f"input_ids must be integer [batch, seq], got {input_ids_BT.dtype}{input_ids_BT.shape}")
        if isinstance(input_ids_BT, jax.core.Tracer):
            return self.forward(input_ids_BT, positions_BT=positions_BT, segment_ids_BT=segment_ids_BT, impl=impl)
        # Called eagerly: run through one cached jit instead of re-tracing the layer scan every call.
        graphdef, state = nnx.split(self)
        return _jitted_forward(graphdef, state, input_ids_BT, positions_BT, segment_ids_BT, impl)

    def forward(self, input_ids_BT, *, positions_BT=None, segment_ids_BT=None, impl: str | None = None):
        cfg = self.cfg
        B, T = input_ids_BT.shape
        impl = impl or cfg.attention_impl
        if positions_BT is None:
            positions_BT = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
        # The embedding gather would otherwise hand the table's fsdp-sharded hidden dimension to the
        # residual stream; constrain() pins every activation's rows to the batch axes instead.
        x_BTD = shd.constrain(self.embed_tokens(input_ids_BT), shd.ACT_BTD)
        if cfg.embedding_multiplier != 1.0:
            x_BTD = x_BTD * jnp.asarray(cfg.embedding_multiplier, x_BTD.dtype)
        cos_BTH, sin_BTH = rope_tables(cfg, positions_BT, dtype_of(cfg.dtype))
        cos_BTH, sin_BTH = shd.constrain(cos_BTH, shd.ACT_BTH), shd.constrain(sin_BTH, shd.ACT_BTH)
        x_BTD = self._run_layers(x_BTD, cos_BTH, sin_BTH, segment_ids_BT, impl)
        x_BTD = shd.constrain(self.norm(x_BTD), shd.ACT_BTD)
        if self.lm_head is None:
            logits_BTV = self.embed_tokens.attend(x_BTD)
        else:
            logits_BTV = self.lm_head(x_BTD)
        logits_BTV = shd.constrain(logits_BTV.astype(jnp.float32), shd.ACT_BTV)
        if cfg.logit_divisor != 1.0:
            logits_BTV = logits_BTV / cfg.logit_divisor
        if cfg.dummy_token_ids:
            dummy_V = jnp.zeros((cfg.vocab_size,), bool).at[jnp.asarray(cfg.dummy_token_ids)].set(True)
            logits_BTV = jnp.where(dummy_V, jnp.finfo(jnp.float32).min, logits_BTV)
        return logits_BTV

    def _run_layers(self, x_BTD, cos_BTH, sin_BTH, segment_ids_BT, impl):
        cfg = self.cfg
        P = cfg.layer_period
        layout = blocksparse_layout(cfg) if cfg.dense_attention_every_n_layers else None
        layouts = [layout if cfg.layer_is_sparse(j) else None for j in range(P)]
        graphdef, state = nnx.split(self.layers)
        state_SP = jax.tree.map(lambda a: a.reshape(cfg.num_layers // P, P, *a.shape[1:]), state)

        def step(x_BTD, st_P):
            for j in range(P):
                block = nnx.merge(graphdef, jax.tree.map(lambda a: a[j], st_P))
                x_BTD = block(x_BTD, cos_BTH, sin_BTH, segment_ids_BT, layouts[j], impl)
            return x_BTD, None

        if cfg.remat != "none":
            step = jax.checkpoint(step, policy=_REMAT_POLICIES[cfg.remat], prevent_cse=not cfg.scan_layers)
        if cfg.scan_layers:
            x_BTD, _ = jax.lax.scan(step, x_BTD, state_SP)
        else:
            for s in range(cfg.num_layers // P):
                x_BTD, _ = step(x_BTD, jax.tree.map(lambda a: a[s], state_SP))
        return x_BTD


@functools.partial(jax.jit, static_argnames=("graphdef", "impl"))
def _jitted_forward(graphdef, state, input_ids_BT, positions_BT, segment_ids_BT, impl):
    model = nnx.merge(graphdef, state)
    return model.forward(input_ids_BT, positions_BT=positions_BT, segment_ids_BT=segment_ids_BT, impl=impl)


def init_model(cfg: ModelConfig, seed: int = 0) -> Decoder:
    return Decoder(cfg, rngs=nnx.Rngs(params=seed))


def abstract_model(cfg: ModelConfig) -> Decoder:
    """The model with ShapeDtypeStruct leaves: shapes and counts without allocating the weights."""
    return nnx.eval_shape(functools.partial(init_model, cfg))
