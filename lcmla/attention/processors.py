"""Attention processors installed once on the UNet; every knob arrives per call.

``IdentityAttnProcessor`` replaces diffusers' ``IPAdapterAttnProcessor2_0`` on the cross-attention
layers (attn2) and takes over its loaded ``to_k_ip``/``to_v_ip`` weights:

    z = Attn(Q, K, V) + λ · Ã V′          (FastFace Eq. 3 and Eq. 7)

where Ã is the identity-branch attention A = softmax(Q K′ᵀ/√d), transformed by AM1/AM2 only in the
targeted blocks, steps and tokens. Everywhere else both terms use the fused
``scaled_dot_product_attention``. ``SelfAttnProcessor`` is the plain self-attention (attn1) that
accepts the same per-call context, so the context can be passed to the whole UNet without
diffusers dropping it with a warning.

The context travels as ``cross_attention_kwargs={"lcmla": AttentionContext}``; with no context the
processors behave exactly like diffusers' stock ones at λ = 1.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .context import AttentionContext, block_kind
from .kv_copy import KVCopyLoRA, kv_copy_projection
from .transforms import am_transform, identity_attention, identity_probs, quantile_positions, transformed_output


def _heads(x: torch.Tensor, batch: int, heads: int) -> torch.Tensor:
    """(B, N, heads·d) → (B, heads, N, d)."""
    return x.view(batch, -1, heads, x.shape[-1] // heads).transpose(1, 2)


def _merge(x: torch.Tensor, batch: int) -> torch.Tensor:
    """(B, heads, N, d) → (B, N, heads·d)."""
    return x.transpose(1, 2).reshape(batch, -1, x.shape[1] * x.shape[-1])


class _Base(nn.Module):
    def __init__(self, name: str):
        super().__init__()
        self.name = name  # the module path, e.g. "down_blocks.1.attentions.0.transformer_blocks.0.attn2.processor"
        self.block = block_kind(name)

    @staticmethod
    def _prepare(attn, hidden_states, temb):
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        shape = None
        if hidden_states.ndim == 4:
            shape = hidden_states.shape
            b, c, h, w = shape
            hidden_states = hidden_states.view(b, c, h * w).transpose(1, 2)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        return hidden_states, shape

    @staticmethod
    def _finish(attn, hidden_states, residual, shape):
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if shape is not None:
            hidden_states = hidden_states.transpose(-1, -2).reshape(shape)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


class SelfAttnProcessor(_Base):
    """Self-attention (attn1) with the fused kernel, and LCM-Lookahead's extended self-attention:
    with a KV cache in the context it records (encoder pass) or appends (denoiser pass) the
    reference keys and values. An empty cache is plain self-attention, bit for bit.

    ``kv_copy`` (None unless a KV-encoder checkpoint of the authors' design is loaded, or the trainer
    adds one): the LoRA of the authors' separate KV projection; when present, the encoder pass
    records K_ref/V_ref from it instead of the layer's own K/V (see ``kv_copy.py``)."""

    def __init__(self, name: str):
        super().__init__(name)
        self.kv_copy: KVCopyLoRA | None = None

    # opaque to torch.compile (lcmla.acceleration): a compiled UNet calls the processors eagerly, so
    # the per-request context never enters a guard (0.4 µs a call when nothing is compiled)
    @torch.compiler.disable
    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 lcmla: AttentionContext | None = None):
        residual = hidden_states
        hidden_states, shape = self._prepare(attn, hidden_states, temb)
        batch = hidden_states.shape[0]
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, hidden_states.shape[1], batch)
            attention_mask = attention_mask.view(batch, attn.heads, -1, attention_mask.shape[-1])
        key_flat = attn.to_k(hidden_states)  # (B, N, C)
        value_flat = attn.to_v(hidden_states)
        kv = None if lcmla is None else lcmla.kv
        ref = None
        if kv is not None:
            if lcmla.kv_record:
                if self.kv_copy is not None:
                    kv.record(self.name, *kv_copy_projection(attn, self.kv_copy, hidden_states, lcmla.kv_copy_scale))
                else:
                    kv.record(self.name, key_flat, value_flat)
            elif lcmla.kv_index is not None:
                ref = kv.read(self.name)
        query = _heads(attn.to_q(hidden_states), batch, attn.heads)
        key = _heads(key_flat, batch, attn.heads)
        value = _heads(value_flat, batch, attn.heads)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        if ref is None:
            out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, dropout_p=0.0, is_causal=False)
        else:
            out = self._extended(attn, query, key, value, ref, lcmla.kv_index, attention_mask)
        out = _merge(out, batch).to(query.dtype)
        return self._finish(attn, out, residual, shape)

    @staticmethod
    def _extended(attn, query, key, value, ref, kv_index, attention_mask):
        """Samples with kv_index −1 attend to themselves; sample i with row r = kv_index[i] attends
        to K = [K_gen ; K_ref[r]], V = [V_gen ; V_ref[r]] (per head, scale 1/√d, no bias)."""
        if attention_mask is not None:
            raise ValueError("extended self-attention does not support attention masks")
        k_rows, v_rows = ref  # (rows, N_ref, C)
        rows = [r for r in kv_index if r >= 0]
        with_kv = [i for i, r in enumerate(kv_index) if r >= 0]
        plain = [i for i, r in enumerate(kv_index) if r < 0]
        heads = attn.heads
        k_ref = _heads(k_rows[rows].to(key.dtype), len(rows), heads)  # (n_kv, heads, N_ref, d)
        v_ref = _heads(v_rows[rows].to(value.dtype), len(rows), heads)
        if attn.norm_k is not None:
            k_ref = attn.norm_k(k_ref)
        k_ext = torch.cat([key[with_kv], k_ref], dim=2)
        v_ext = torch.cat([value[with_kv], v_ref], dim=2)
        out_kv = F.scaled_dot_product_attention(query[with_kv], k_ext, v_ext, dropout_p=0.0, is_causal=False)
        if not plain:
            return out_kv
        out_plain = F.scaled_dot_product_attention(query[plain], key[plain], value[plain], dropout_p=0.0, is_causal=False)
        if plain == list(range(len(plain))):  # the usual layout: no-KV branches first
            return torch.cat([out_plain, out_kv])
        out = torch.empty_like(query)
        out[plain], out[with_kv] = out_plain, out_kv
        return out


class IdentityAttnProcessor(_Base):
    """Decoupled cross-attention of IP-Adapter with FastFace AM and map capture, per call."""

    def __init__(self, name: str, to_k_ip: nn.ModuleList, to_v_ip: nn.ModuleList):
        super().__init__(name)
        self.to_k_ip = to_k_ip  # the very modules diffusers loaded: no copy, no reload
        self.to_v_ip = to_v_ip
        #: the transformed identity branch: None = ``transforms.identity_attention`` run eagerly;
        #: ``lcmla.acceleration`` sets its compiled form (a load-time choice, never per request)
        self.am_attention = None

    @classmethod
    def take_over(cls, name: str, stock) -> "IdentityAttnProcessor":
        """Build from a loaded ``IPAdapterAttnProcessor2_0`` (one IP-Adapter)."""
        if len(stock.to_k_ip) != 1:
            raise ValueError(f"{name}: lcmla supports exactly one IP-Adapter (found {len(stock.to_k_ip)})")
        return cls(name, stock.to_k_ip, stock.to_v_ip)

    # opaque to torch.compile (lcmla.acceleration): a compiled UNet calls the processors eagerly, so
    # the per-request context never enters a guard (0.4 µs a call when nothing is compiled)
    @torch.compiler.disable
    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 lcmla: AttentionContext | None = None):
        residual = hidden_states
        text_states, ip_states = encoder_hidden_states  # (B, 77, D), [(B, 1, T, D)]
        hidden_states, shape = self._prepare(attn, hidden_states, temb)
        batch = hidden_states.shape[0]
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, text_states.shape[1], batch)
            attention_mask = attention_mask.view(batch, attn.heads, -1, attention_mask.shape[-1])
        query = attn.to_q(hidden_states)
        if attn.norm_cross:
            text_states = attn.norm_encoder_hidden_states(text_states)
        key = _heads(attn.to_k(text_states), batch, attn.heads)
        value = _heads(attn.to_v(text_states), batch, attn.heads)
        query = _heads(query, batch, attn.heads)  # (B, heads, Q, d)
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, dropout_p=0.0, is_causal=False)
        out = _merge(out, batch).to(query.dtype)  # (B, Q, C)

        scale = 1.0 if lcmla is None else lcmla.ip_scale
        if scale != 0:
            ip = ip_states[0]
            ip_key = _heads(self.to_k_ip[0](ip), batch, attn.heads)  # (B, heads, T, d)
            ip_value = _heads(self.to_v_ip[0](ip), batch, attn.heads)
            out = out + scale * self._identity_branch(attn, query, ip_key, ip_value, batch, lcmla)
        return self._finish(attn, out, residual, shape)

    def _identity_branch(self, attn, query, ip_key, ip_value, batch, ctx: AttentionContext | None) -> torch.Tensor:
        """Ã V′ for the identity tokens: fused SDPA when nothing is asked; the transformed branch
        (``identity_attention``, compiled when the engine was loaded with ``compile``) otherwise;
        explicit probabilities kept when the maps are captured."""
        active = ctx is not None and ctx.am.active(self.block, ctx.step)
        capture = ctx is not None and ctx.capture is not None
        if not active:
            ip_out = F.scaled_dot_product_attention(query, ip_key, ip_value, attn_mask=None, dropout_p=0.0, is_causal=False)
            if capture:  # the maps are computed on the side; the output above is untouched
                probs = identity_probs(query, ip_key, attn.scale)
                i = ctx.capture_index
                ctx.capture.record(self.name, ctx.step, probs[i], probs[i])
            return _merge(ip_out, batch).to(query.dtype)

        am = self.am_arguments(ctx, queries=query.shape[2], tokens=ip_key.shape[2])
        if not capture:
            ip_out = (self.am_attention or identity_attention)(query, ip_key, ip_value, attn.scale, **am)
            return _merge(ip_out, batch).to(query.dtype)
        # the same computation as identity_attention, keeping A and Ã for the maps
        probs = identity_probs(query, ip_key, attn.scale)  # (B, heads, Q, T)
        new = am_transform(probs, **am)
        ip_out = transformed_output(probs, new, ip_value, **am)  # (B, heads, Q, d)
        i = ctx.capture_index
        ctx.capture.record(self.name, ctx.step, probs[i], new[i])
        return _merge(ip_out, batch).to(query.dtype)

    def am_arguments(self, ctx: AttentionContext, queries: int, tokens: int) -> dict:
        """``am_transform``'s keywords for this layer at ``ctx.step``, for ``queries`` positions and
        ``tokens`` identity tokens: plain Python values resolved here, so that a compiled branch
        gets floats as graph inputs (a new knob value does not recompile) and no index arithmetic
        on them (the chosen tokens as bools, the quantile's positions as ints)."""
        am, step = ctx.am, ctx.step
        args = dict(mode=am.mode, chosen=tuple(t in am.tokens for t in range(tokens)), cap=am.cap)
        if am.mode == "am1":
            args.update(am1_scale=am.am1_scale_up if self.block == "up" else am.am1_scale_down,
                        am1_power=am.am1_power)
        else:
            k = min(step, len(am.am2_sharpness) - 1)
            args.update(sharpness=am.am2_sharpness[k], quantile=am.am2_quantile, am2_scale=am.am2_scale[k],
                        adain=am.am2_adain, adain_weight=am.adain_weight, group=ctx.am_group,
                        quantile_at=quantile_positions(queries, am.am2_quantile))
        return args


_UNET_BLOCKS = ("down_blocks", "mid_block", "up_blocks")


def install_processors(unet) -> dict[str, nn.Module]:
    """Replace the UNet's processors with lcmla's, once, at load time. Returns the new map."""
    from diffusers.models.attention_processor import IPAdapterAttnProcessor2_0

    procs: dict[str, nn.Module] = {}
    for name, proc in unet.attn_processors.items():
        if isinstance(proc, IPAdapterAttnProcessor2_0):
            procs[name] = IdentityAttnProcessor.take_over(name, proc)
        elif isinstance(proc, (IdentityAttnProcessor, SelfAttnProcessor)) or not name.startswith(_UNET_BLOCKS):
            procs[name] = proc  # ours already, or outside the denoiser (e.g. the FaceID resampler)
        elif name.endswith("attn1.processor"):
            procs[name] = SelfAttnProcessor(name)
        else:
            raise ValueError(f"{name}: unexpected attention processor {type(proc).__name__}; load the IP-Adapter first")
    unet.set_attn_processor(procs)
    return procs
