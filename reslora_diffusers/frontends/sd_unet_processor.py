"""``ResLoRAAttnProcessor``: diffusers attention with the ResLoRA branches of q, k, v and out.

It computes what diffusers' ``AttnProcessor2_0`` computes (spatial and group norm,
cross-attention norm, masks, residual connection, ``rescale_output_factor``) with
``F.scaled_dot_product_attention``. Projections wrapped by ``add_reslora`` run their frozen
base layer and their branch; the A projections of branches that read the same input (q, k,
v in self-attention; k, v in cross-attention) are one matrix product.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..core import ResLoRALayer


def project(modules: list[nn.Module], x: torch.Tensor) -> list[torch.Tensor]:
    """Apply several projections to the same input, fusing the A products of ResLoRA blocks.

    For block ``i``: ``y_i = W_i x + s B_stack_i(mid_i)``, where the ``A_stack_i`` products of
    the blocks whose :meth:`~reslora_diffusers.core.ResLoRALayer.branch_input` is the shared
    ``dropout(x)`` come from one product ``dropout(x) @ [A_stack_1; A_stack_2; ...]^T`` (through
    the blocks' public ``start`` / ``branch_input`` / ``finish`` calls); a block whose type
    folds earlier inputs into its own (``is``) applies its ``A`` alone.
    """
    blocks = [m for m in modules if isinstance(m, ResLoRALayer)]
    if len(blocks) < 2:
        return [m(x) for m in modules]
    xd = blocks[0].dropout(x)
    started = {b: b.start(x) for b in blocks}
    inputs = {b: b.branch_input(started[b][0], xd) for b in blocks}
    shared = [b for b in blocks if inputs[b] is xd]
    if len(shared) < 2:
        shared = []
    ax = {b: b.apply_a(inputs[b], started[b][1]) for b in blocks if b not in shared}
    if shared:
        rows = [started[b][1] for b in shared]
        fused = shared[0].apply_a(xd, torch.cat(rows, dim=0))
        ax.update(zip(shared, fused.split([a.shape[0] for a in rows], dim=-1)))
    outs = []
    for m in modules:
        if m in ax:
            base = m.base_layer(x)
            outs.append(base + m.finish(started[m][0], x, ax[m]).to(base.dtype))
        else:
            outs.append(m(x))
    return outs


class ResLoRAAttnProcessor:
    """Attention processor for :class:`diffusers.models.attention_processor.Attention`."""

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        *args,
        **kwargs,
    ) -> torch.Tensor:
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)

        batch_size, sequence_length, _ = (
            hidden_states.shape if encoder_hidden_states is None else encoder_hidden_states.shape
        )
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        if encoder_hidden_states is None:
            query, key, value = project([attn.to_q, attn.to_k, attn.to_v], hidden_states)
        else:
            if attn.norm_cross:
                encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
            query = attn.to_q(hidden_states)
            key, value = project([attn.to_k, attn.to_v], encoder_hidden_states)

        head_dim = key.shape[-1] // attn.heads
        query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        hidden_states = F.scaled_dot_product_attention(
            query, key, value, attn_mask=attention_mask, dropout_p=0.0, is_causal=False
        )
        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
        hidden_states = hidden_states.to(query.dtype)

        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor
