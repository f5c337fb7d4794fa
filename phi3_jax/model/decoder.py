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
from phi3_jax.model.attention import Attention, qkv_split
from phi3_jax.model.cache import KVCache
from phi3_jax.model.config import ModelConfig
from phi3_jax.model.layers import (MLP, Embed, Linear, Norm, dropout, dtype_of, fold_rows, gate_up_split,
                                   regroup_columns, rope_tables)
from phi3_jax.ops.cross_entropy import head_logits, head_loss, head_token_nll


class Block(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.cfg = cfg
        self.input_layernorm = Norm(cfg, rngs)
        self.self_attn = Attention(cfg, rngs)
        self.post_attention_layernorm = Norm(cfg, rngs)
        self.mlp = MLP(cfg, rngs)

    def __call__(self, x_BTD, cos_BTH, sin_BTH, segment_ids_BT, layout, impl, kv_cache=None, dropout_keys_B=None,
                 residual_BTD=None, defer_residual: bool = False, regrouped: bool = False):
        """[B, T, D] -> [B, T, D]; with `kv_cache` (see Attention) -> ([B, T, D], updated (k, v)).
        `dropout_keys_B` (this layer's per-row keys) turns on the config's residual dropout.

        Each residual add runs with the norm after it as one op (`Norm.add_norm`). Across blocks:
        `defer_residual` returns (x, m) for the block's output x + m, and the next block takes that m as
        `residual_BTD`, so its input norm does the add. `regrouped`: the fused kernels' columns are regrouped
        for tensor parallelism already (`Linear.split`)."""
        cfg = self.cfg
        # Residual stream pinned at the sublayer boundaries (no-op outside shd.activation_sharding).
        if residual_BTD is None:
            x_BTD = shd.constrain(x_BTD, shd.ACT_BTD)
            n_BTD = self.input_layernorm(x_BTD)
        else:
            x_BTD, n_BTD = self.input_layernorm.add_norm(x_BTD, residual_BTD)
            x_BTD = shd.constrain(x_BTD, shd.ACT_BTD)
        a_BTD = self.self_attn(n_BTD, cos_BTH, sin_BTH, segment_ids_BT=segment_ids_BT, layout=layout, impl=impl,
                               kv_cache=kv_cache, regrouped=regrouped)
        if kv_cache is not None:
            a_BTD, kv = a_BTD
        if dropout_keys_B is not None and cfg.resid_attn_dropout > 0:
            a_BTD = dropout(a_BTD, cfg.resid_attn_dropout, dropout_keys_B, 0)
        x_BTD, n_BTD = self.post_attention_layernorm.add_norm(x_BTD, a_BTD)
        x_BTD = shd.constrain(x_BTD, shd.ACT_BTD)
        m_BTD = self.mlp(n_BTD, regrouped)
        if dropout_keys_B is not None and cfg.resid_mlp_dropout > 0:
            m_BTD = dropout(m_BTD, cfg.resid_mlp_dropout, dropout_keys_B, 1)
        if defer_residual:
            return x_BTD, shd.constrain(m_BTD, shd.ACT_BTD)
        x_BTD = shd.constrain(x_BTD + m_BTD, shd.ACT_BTD)
        return x_BTD if kv_cache is None else (x_BTD, kv)


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

    def __call__(self, input_ids_BT, *, positions_BT=None, segment_ids_BT=None, impl: str | None = None,
                 cache=None):
        """Logits [B, T, vocab] (float32); with `cache` (a `KVCache`), (logits, the cache with these tokens)."""
        input_ids_BT = jnp.asarray(input_ids_BT)
        if input_ids_BT.ndim != 2 or not jnp.issubdtype(input_ids_BT.dtype, jnp.integer):
            raise ValueError(f"input_ids must be integer [batch, seq], got {input_ids_BT.dtype}{input_ids_BT.shape}")
        if isinstance(input_ids_BT, jax.core.Tracer):
            return self.forward(input_ids_BT, positions_BT=positions_BT, segment_ids_BT=segment_ids_BT, impl=impl,
                                cache=cache)
        # Called eagerly: run through one cached jit instead of re-tracing the layer scan every call.
        graphdef, state = nnx.split(self)
        return _jitted_forward(graphdef, state, input_ids_BT, positions_BT, segment_ids_BT, cache, impl)

    def forward(self, input_ids_BT, *, positions_BT=None, segment_ids_BT=None, impl: str | None = None,
                cache=None):
        x_BTD, kv = self.hidden(input_ids_BT, positions_BT=positions_BT, segment_ids_BT=segment_ids_BT, impl=impl,
                                cache=cache)
        logits_BTV = self.logits(x_BTD)
        if cache is None:
            return logits_BTV
        return logits_BTV, KVCache(*kv, cache.lengths_B + input_ids_BT.shape[1])

    def hidden(self, input_ids_BT, *, positions_BT=None, segment_ids_BT=None, impl: str | None = None, cache=None,
               dropout_keys_B=None):
        """(final-norm hidden states [B, T, D], with `cache` the updated (k, v) else None): all but the head.

        `dropout_keys_B` (one PRNG key per row, training only) applies the config's dropout; without it the
        model is deterministic."""
        cfg = self.cfg
        B, T = input_ids_BT.shape
        impl = impl or cfg.attention_impl
        # A prefill into an empty cache at the default positions: the tokens attend among themselves.
        prefill = cache is not None and cache.empty and positions_BT is None
        if cache is not None:
            if segment_ids_BT is not None:
                raise ValueError("a forward with a KV cache takes no segment ids (one document per row)")
            if positions_BT is None:  # tokens continue each row where its cache ends
                positions_BT = cache.lengths_B[:, None] + jnp.arange(T, dtype=jnp.int32)
        if positions_BT is None:
            positions_BT = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
        # The embedding gather would otherwise hand the table's fsdp-sharded hidden dimension to the
        # residual stream; constrain() pins every activation's rows to the batch axes instead.
        x_BTD = shd.constrain(self.embed_tokens(input_ids_BT), shd.ACT_BTD)
        if cfg.embedding_multiplier != 1.0:
            x_BTD = x_BTD * jnp.asarray(cfg.embedding_multiplier, x_BTD.dtype)
        if dropout_keys_B is not None and cfg.embd_dropout > 0:
            # Folded with num_layers: a stream no layer uses (layer l folds with l).
            x_BTD = dropout(x_BTD, cfg.embd_dropout, fold_rows(dropout_keys_B, cfg.num_layers), 0)
        cos_BTH, sin_BTH = rope_tables(cfg, positions_BT, dtype_of(cfg.dtype))
        cos_BTH, sin_BTH = shd.constrain(cos_BTH, shd.ACT_BTH), shd.constrain(sin_BTH, shd.ACT_BTH)
        kv = None if cache is None else (cache.k_LBSKH, cache.v_LBSKH, cache.lengths_B,
                                         None if prefill else positions_BT)
        keys = dropout_keys_B if cfg.resid_attn_dropout > 0 or cfg.resid_mlp_dropout > 0 else None
        x_BTD, kv, m_BTD = self._run_layers(x_BTD, cos_BTH, sin_BTH, segment_ids_BT, impl, kv, keys)
        n_BTD = self.norm(x_BTD) if m_BTD is None else self.norm.add_norm(x_BTD, m_BTD)[1]
        return shd.constrain(n_BTD, shd.ACT_BTD), kv

    def head_weight(self):
        """The output projection [D, vocab] (the embedding table, transposed, when tied)."""
        return self.embed_tokens.embedding[...].T if self.lm_head is None else self.lm_head.kernel[...]

    def logits(self, x_BTD):
        """float32 logits [B, T, vocab] from final hidden states: head matmul in the compute dtype, phi-3-small's
        divisor and masked padding rows."""
        return head_logits(x_BTD, self.head_weight(), self.cfg.logit_divisor, tuple(self.cfg.dummy_token_ids or ()))

    def loss_sums(self, input_ids_BT, targets_BT, mask_BT, *, positions_BT=None, segment_ids_BT=None,
                  impl: str | None = None, chunks: int = 1, dropout_keys_B=None):
        """(sum of masked next-token cross-entropies, number of loss tokens), both float32. The head and the
        loss run as one op (`ops.cross_entropy.head_loss`), so no float32 [B, T, vocab] array is kept."""
        x_BTD, _ = self.hidden(input_ids_BT, positions_BT=positions_BT, segment_ids_BT=segment_ids_BT, impl=impl,
                               dropout_keys_B=dropout_keys_B)
        mask_BT = jnp.asarray(mask_BT, jnp.float32)
        loss = head_loss(x_BTD, self.head_weight(), targets_BT, mask_BT, divisor=self.cfg.logit_divisor,
                         dummy_ids=tuple(self.cfg.dummy_token_ids or ()), chunks=chunks)
        return loss, jnp.sum(mask_BT)

    def token_nll(self, input_ids_BT, targets_BT, *, positions_BT=None, segment_ids_BT=None,
                  impl: str | None = None, chunks: int = 1, dropout_keys_B=None):
        """float32 [B, T]: each token's next-token cross-entropy (-log p(target)), from the head as one op
        (`ops.cross_entropy.head_token_nll`; `chunks` > 1 keeps only a slice of the logits at a time)."""
        x_BTD, _ = self.hidden(input_ids_BT, positions_BT=positions_BT, segment_ids_BT=segment_ids_BT, impl=impl,
                               dropout_keys_B=dropout_keys_B)
        return head_token_nll(x_BTD, self.head_weight(), targets_BT, divisor=self.cfg.logit_divisor,
                              dummy_ids=tuple(self.cfg.dummy_token_ids or ()), chunks=chunks)

    def _run_layers(self, x_BTD, cos_BTH, sin_BTH, segment_ids_BT, impl, kv=None, dropout_keys_B=None):
        """(x, kv, m) after every layer: the output is x + m, where m is the last block's MLP output left for the
        final norm to add (None: x is the output); with `kv` = (k_LBSKH, v_LBSKH, lengths_B, positions_BT)
        kv is the updated (k_LBSKH, v_LBSKH) (else None; positions None: a prefill into an empty cache, see
        Attention). With `dropout_keys_B`, layer l drops with the row keys folded with l."""
        cfg = self.cfg
        P = cfg.layer_period
        layout = blocksparse_layout(cfg) if cfg.dense_attention_every_n_layers else None
        layouts = [layout if cfg.layer_is_sparse(j) else None for j in range(P)]
        graphdef, state = nnx.split(self.layers)
        state, regrouped = _regroup_fused_kernels(cfg, state)
        by_step = lambda a: a.reshape(cfg.num_layers // P, P, *a.shape[1:])  # noqa: E731
        # One scanned tree per layer of the period, so a layer's weights are the scan's own slices: the
        # backward pass then reads them from the stacked input, where weights indexed inside the body
        # would be saved again as stacked residuals (a zero-filled copy of every weight each step).
        xs = (tuple(jax.tree.map(lambda a: by_step(a)[:, j], state) for j in range(P)),
              by_step(jnp.arange(cfg.num_layers, dtype=jnp.uint32)))
        # The stacked KV cache rides in the carry, not in xs / ys: each layer writes its new tokens in place,
        # where scanned inputs and outputs would copy the whole cache for every token.
        # Unrolled, each block leaves its last residual add to the next block's input norm (and the last
        # one's to the final norm): the add and the norm then run as one op. Under the scan the carry stays x
        # alone, as a layer's saved input for the backward pass.
        defer = not cfg.scan_layers and kv is None
        carry = (x_BTD, None if kv is None else kv[:2], None)

        def step(carry, xs_P):
            x_BTD, kv_L, m_BTD = carry
            st_P, ids_P = xs_P
            for j in range(P):
                block = nnx.merge(graphdef, st_P[j])
                if kv_L is None:
                    keys = None if dropout_keys_B is None else fold_rows(dropout_keys_B, ids_P[j])
                    out = block(x_BTD, cos_BTH, sin_BTH, segment_ids_BT, layouts[j], impl, dropout_keys_B=keys,
                                residual_BTD=m_BTD, defer_residual=defer, regrouped=regrouped)
                    x_BTD, m_BTD = out if defer else (out, None)
                else:
                    x_BTD, kv_L = block(x_BTD, cos_BTH, sin_BTH, segment_ids_BT, layouts[j], impl,
                                        kv_cache=(*kv_L, ids_P[j].astype(jnp.int32), kv[2], kv[3]),
                                        regrouped=regrouped)
            return (x_BTD, kv_L, m_BTD), None

        if cfg.remat != "none":
            step = jax.checkpoint(step, policy=_REMAT_POLICIES[cfg.remat], prevent_cse=not cfg.scan_layers)
        if cfg.scan_layers:
            carry, _ = jax.lax.scan(step, carry, xs)
        else:
            for s in range(cfg.num_layers // P):
                carry, _ = step(carry, jax.tree.map(lambda a: a[s], xs))
        return carry


def _regroup_fused_kernels(cfg: ModelConfig, state):
    """(state, regrouped): under tensor parallelism the layers' stacked [q | k | v] and [gate | up] kernels and
    biases with their columns regrouped per device (`Linear.split`), once for all layers before their scan, in
    the compute dtype and the parameters' sharding. Regrouping inside each layer instead moves every layer's
    slices between devices in each pass over it (forward, rematerialised forward, backward)."""
    plans = {"self_attn/qkv_proj/": qkv_split(cfg), "mlp/gate_up_proj/": gate_up_split(cfg)}
    plans = {prefix: plan for prefix, plan in plans.items() if plan[1] > 1}
    if not plans:
        return state, False
    dtype = dtype_of(cfg.dtype)

    def leaf(path, a):
        name = shd.path_str(path).removesuffix("/value")
        for prefix, (sizes, shards) in plans.items():
            if name.startswith(prefix):
                a_LXF = regroup_columns(a.astype(dtype), sizes, shards).reshape(a.shape)
                return shd.constrain(a_LXF, shd.param_logical_axes(("layers", *name.split("/")), a.ndim))
        return a

    return jax.tree_util.tree_map_with_path(leaf, state), True


@functools.partial(jax.jit, static_argnames=("graphdef", "impl"))
def _jitted_forward(graphdef, state, input_ids_BT, positions_BT, segment_ids_BT, cache, impl):
    model = nnx.merge(graphdef, state)
    return model.forward(input_ids_BT, positions_BT=positions_BT, segment_ids_BT=segment_ids_BT, impl=impl,
                         cache=cache)


def init_model(cfg: ModelConfig, seed: int = 0) -> Decoder:
    return Decoder(cfg, rngs=nnx.Rngs(params=seed))


def abstract_model(cfg: ModelConfig) -> Decoder:
    """The model with ShapeDtypeStruct leaves: shapes and counts without allocating the weights."""
    return nnx.eval_shape(functools.partial(init_model, cfg))
