"""Tiny random-weight models for tests: Hugging Face families built from configs, and nanoGPT.

No downloads: every model is built from a config in code. Each builder returns
(model, example keyword inputs, keyword arguments for the forward).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

VOCAB = 128


def _ids(batch: int, seq: int) -> torch.Tensor:
    return torch.randint(3, VOCAB, (batch, seq))


def _padding(batch: int, seq: int, left: bool) -> torch.Tensor:
    mask = torch.ones(batch, seq, dtype=torch.long)
    if left:
        mask[1, :3] = 0
    else:
        mask[1, -4:] = 0
    return mask


def hf_model(name: str, attn: str):
    import transformers as T

    small = dict(attn_implementation=attn)
    if name == "gpt2":
        cfg = T.GPT2Config(n_layer=2, n_head=4, n_embd=64, vocab_size=VOCAB, n_positions=64,
                           bos_token_id=1, eos_token_id=2, **small)
        return T.GPT2LMHeadModel(cfg), {"input_ids": _ids(2, 16)}, {"use_cache": False}
    if name in ("llama", "mistral", "qwen2"):
        config, model = {"llama": (T.LlamaConfig, T.LlamaForCausalLM), "mistral": (T.MistralConfig, T.MistralForCausalLM),
                         "qwen2": (T.Qwen2Config, T.Qwen2ForCausalLM)}[name]
        cfg = config(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, hidden_size=64,
                     intermediate_size=128, vocab_size=VOCAB, max_position_embeddings=64, **small)
        inputs = {"input_ids": _ids(2, 16), "attention_mask": _padding(2, 16, left=True)}
        return model(cfg), inputs, {"use_cache": False}
    if name == "bert":
        cfg = T.BertConfig(num_hidden_layers=2, num_attention_heads=4, hidden_size=64, intermediate_size=128,
                           vocab_size=VOCAB, **small)
        return T.BertModel(cfg), {"input_ids": _ids(2, 16), "attention_mask": _padding(2, 16, left=False)}, {}
    if name == "t5":
        cfg = T.T5Config(num_layers=2, num_decoder_layers=2, num_heads=4, d_model=64, d_kv=16, d_ff=128,
                         vocab_size=VOCAB, **small)
        return T.T5Model(cfg), {"input_ids": _ids(2, 16), "decoder_input_ids": _ids(2, 8)}, {"use_cache": False}
    if name == "vit":
        cfg = T.ViTConfig(num_hidden_layers=2, num_attention_heads=4, hidden_size=64, intermediate_size=128,
                          image_size=32, patch_size=8, **small)
        return T.ViTModel(cfg), {"pixel_values": torch.randn(2, 3, 32, 32)}, {}
    if name == "whisper":
        cfg = T.WhisperConfig(encoder_layers=2, decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4,
                              d_model=64, encoder_ffn_dim=128, decoder_ffn_dim=128, vocab_size=VOCAB, pad_token_id=0,
                              bos_token_id=1, eos_token_id=2, decoder_start_token_id=1, num_mel_bins=16,
                              max_source_positions=32, max_target_positions=32, **small)
        inputs = {"input_features": torch.randn(2, 16, 64), "decoder_input_ids": _ids(2, 8)}
        return T.WhisperModel(cfg), inputs, {"use_cache": False}
    if name == "bart":
        cfg = T.BartConfig(encoder_layers=2, decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4,
                           d_model=64, encoder_ffn_dim=128, decoder_ffn_dim=128, vocab_size=VOCAB,
                           max_position_embeddings=64, **small)
        return T.BartModel(cfg), {"input_ids": _ids(2, 16), "decoder_input_ids": _ids(2, 8)}, {"use_cache": False}
    raise KeyError(name)


class NanoGPTAttention(nn.Module):
    """karpathy/nanoGPT's CausalSelfAttention: the SDPA path, or the slow path with the tril buffer."""

    def __init__(self, dim: int = 64, heads: int = 4, max_len: int = 64, flash: bool = False, dropout: float = 0.0):
        super().__init__()
        self.c_attn, self.c_proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.n_head, self.n_embd, self.flash, self.dropout = heads, dim, flash, dropout
        self.attn_dropout = nn.Dropout(dropout)
        self.register_buffer("bias", torch.tril(torch.ones(max_len, max_len)).view(1, 1, max_len, max_len))

    def forward(self, x):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        if self.flash:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=None,
                                               dropout_p=self.dropout if self.training else 0, is_causal=True)
        else:
            att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
            att = att.masked_fill(self.bias[:, :, :T, :T] == 0, float("-inf"))
            att = self.attn_dropout(F.softmax(att, dim=-1))
            y = att @ v
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.c_proj(y)


def nanogpt(flash: bool, layers: int = 2, dropout: float = 0.0) -> nn.Module:
    return nn.Sequential(*(NanoGPTAttention(flash=flash, dropout=dropout) for _ in range(layers)))


class GPT2LegacyAttention(nn.Module):
    """The transformers 4.x GPT-2 attention body: a bool causal buffer selected with torch.where and
    finfo.min, the scores divided by a 0-d tensor, an additive padding mask, softmax, dropout."""

    def __init__(self, dim: int = 64, heads: int = 4, max_len: int = 64):
        super().__init__()
        self.c_attn, self.c_proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.heads, self.dim = heads, dim
        self.register_buffer("bias", torch.tril(torch.ones(max_len, max_len, dtype=torch.bool)).view(1, 1, max_len, max_len))
        self.attn_dropout = nn.Dropout(0.0)

    def forward(self, x, attention_mask):
        b, t, c = x.shape
        q, k, v = (z.view(b, t, self.heads, c // self.heads).transpose(1, 2) for z in self.c_attn(x).split(c, dim=2))
        w = torch.matmul(q, k.transpose(-1, -2))
        w = w / torch.full([], v.size(-1) ** 0.5, dtype=w.dtype, device=w.device)
        causal = self.bias[:, :, :t, :t]
        w = torch.where(causal, w, torch.full([], torch.finfo(w.dtype).min, dtype=w.dtype, device=w.device))
        w = w + attention_mask
        w = self.attn_dropout(nn.functional.softmax(w, dim=-1).type(v.dtype))
        return self.c_proj(torch.matmul(w, v).transpose(1, 2).reshape(b, t, c))


class TimmAttention(nn.Module):
    """timm's unfused Attention: fused qkv, reshape/permute/unbind, q scaled before the matmul."""

    def __init__(self, dim: int = 64, heads: int = 4):
        super().__init__()
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.heads, self.scale = heads, (dim // heads) ** -0.5

    def forward(self, x):
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        q = q * self.scale
        attn = (q @ k.transpose(-2, -1)).softmax(dim=-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(B, N, C))
