"""Tiny random-initialised third-party Transformers built from configs (nothing is downloaded).

Each factory returns ``(model, example_inputs)`` with ``model(**example_inputs)`` a valid forward;
it calls ``pytest.importorskip`` for its library, so a test using it skips cleanly when the
library is absent.  Shared by the monitor and sigmaReparam compatibility tests: keep the names.
"""
from __future__ import annotations

import pytest
import torch


def _ids(vocab: int, batch: int, seq: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, seq), generator=g)


def tiny_gpt2(attn_implementation: str = "sdpa", *, batch: int = 2, seq: int = 12, seed: int = 0,
              **config):
    """Hugging Face GPT-2 (causal, fused c_attn with biases): 2 layers, 4 heads, d=32."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(vocab_size=97, n_positions=64, n_embd=32, n_layer=2, n_head=4,
                                  attn_implementation=attn_implementation, **config)
    model = transformers.GPT2LMHeadModel(cfg)
    return model, {"input_ids": _ids(97, batch, seq, seed)}


def tiny_bert(attn_implementation: str = "sdpa", *, batch: int = 3, seq: int = 10, seed: int = 0,
              padding: bool = True, **config):
    """Hugging Face BERT (bidirectional, q/k with biases): 2 layers, 4 heads, d=32; with
    ``padding`` the later batch elements are right-padded (an attention mask with zeros)."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    cfg = transformers.BertConfig(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=64, max_position_embeddings=64,
                                  attn_implementation=attn_implementation, **config)
    model = transformers.BertModel(cfg, add_pooling_layer=False)
    mask = torch.ones(batch, seq, dtype=torch.long)
    if padding:
        for b in range(1, batch):
            mask[b, seq - 3 * b:] = 0
    return model, {"input_ids": _ids(97, batch, seq, seed), "attention_mask": mask}


def tiny_llama(attn_implementation: str = "sdpa", *, batch: int = 2, seq: int = 12, seed: int = 0,
               **config):
    """Hugging Face Llama (causal, rotary, grouped-query: 4 query heads share 2 key heads), d=32."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   attn_implementation=attn_implementation, **config)
    model = transformers.LlamaForCausalLM(cfg)
    return model, {"input_ids": _ids(97, batch, seq, seed)}


def tiny_xtransformer(*, flash: bool = True, batch: int = 2, seq: int = 12, seed: int = 0, **attn):
    """x-transformers decoder (causal), 2 layers, 4 heads of 8, d=32; ``attn`` adds ``attn_*`` options
    (e.g. ``rotary_pos_emb=True`` at the decoder level is passed through ``rotary_pos_emb``)."""
    xt = pytest.importorskip("x_transformers")
    torch.manual_seed(seed)
    rotary = attn.pop("rotary_pos_emb", False)
    model = xt.TransformerWrapper(
        num_tokens=97, max_seq_len=64,
        attn_layers=xt.Decoder(dim=32, depth=2, heads=4, attn_dim_head=8, attn_flash=flash,
                               rotary_pos_emb=rotary, **{f"attn_{k}": v for k, v in attn.items()}))
    return model, {"x": _ids(97, batch, seq, seed)}


def tiny_gpt_neox(attn_implementation: str = "sdpa", *, batch: int = 2, seq: int = 12, seed: int = 0,
                  **config):
    """Hugging Face GPT-NeoX (causal, rotary, fused ``query_key_value`` whose rows interleave q, k
    and v per head): 2 layers, 4 heads, d=32."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    config = {"num_hidden_layers": 2, **config}
    cfg = transformers.GPTNeoXConfig(vocab_size=97, hidden_size=32, num_attention_heads=4,
                                     intermediate_size=64, max_position_embeddings=64,
                                     attn_implementation=attn_implementation, **config)
    model = transformers.GPTNeoXForCausalLM(cfg)
    return model, {"input_ids": _ids(97, batch, seq, seed)}


def tiny_t5(attn_implementation: str = "eager", *, batch: int = 2, seq: int = 10, seed: int = 0, **config):
    """Hugging Face T5 (encoder-decoder, a ``relative_attention_bias`` Embedding in the first
    self-attention of each stack, tied ``lm_head``): 2+2 layers, 4 heads of 8, d=32."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    config = {"num_layers": 2, **config}
    cfg = transformers.T5Config(vocab_size=97, d_model=32, d_kv=8, d_ff=64, num_heads=4,
                                dropout_rate=0.0, decoder_start_token_id=0,
                                attn_implementation=attn_implementation, **config)
    model = transformers.T5ForConditionalGeneration(cfg)
    return model, {"input_ids": _ids(97, batch, seq, seed), "decoder_input_ids": _ids(97, batch, seq - 2, seed + 1)}


def _causal_lm(config_cls, model_cls, attn_implementation, batch, seq, seed, config):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    sizes = dict(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=64)  # (``config`` may override them)
    cfg = getattr(transformers, config_cls)(**{**sizes, **config}, attn_implementation=attn_implementation)
    return getattr(transformers, model_cls)(cfg), {"input_ids": _ids(97, batch, seq, seed)}


def tiny_mistral(attn_implementation: str = "sdpa", *, batch: int = 2, seq: int = 12, seed: int = 0, **config):
    """Hugging Face Mistral (causal, rotary, grouped-query 4 query / 2 key heads, sliding window 6), d=32."""
    config.setdefault("sliding_window", 6)
    return _causal_lm("MistralConfig", "MistralForCausalLM", attn_implementation, batch, seq, seed, config)


def tiny_qwen2(attn_implementation: str = "sdpa", *, batch: int = 2, seq: int = 12, seed: int = 0, **config):
    """Hugging Face Qwen2 (causal, rotary, q/k/v biases, grouped-query 4 query / 2 key heads), d=32."""
    return _causal_lm("Qwen2Config", "Qwen2ForCausalLM", attn_implementation, batch, seq, seed, config)


def tiny_gemma2(attn_implementation: str = "eager", *, batch: int = 2, seq: int = 12, seed: int = 0, **config):
    """Hugging Face Gemma2 (causal, rotary, grouped-query, logit soft-capping, a sliding-window layer
    then a global one), head_dim 8, d=32."""
    config.setdefault("head_dim", 8)
    config.setdefault("sliding_window", 6)
    return _causal_lm("Gemma2Config", "Gemma2ForCausalLM", attn_implementation, batch, seq, seed, config)


def tiny_vit(attn_implementation: str = "sdpa", *, batch: int = 2, seed: int = 0, **config):
    """Hugging Face ViT (bidirectional over 16 patches + CLS of a 16x16 image), 2 layers, 4 heads, d=32."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    config = {"num_hidden_layers": 2, **config}
    cfg = transformers.ViTConfig(image_size=16, patch_size=4, num_channels=3, hidden_size=32,
                                 num_attention_heads=4, intermediate_size=64,
                                 attn_implementation=attn_implementation, **config)
    g = torch.Generator().manual_seed(seed)
    return transformers.ViTModel(cfg, add_pooling_layer=False), {"pixel_values": torch.randn(batch, 3, 16, 16,
                                                                                              generator=g)}


def tiny_whisper(attn_implementation: str = "sdpa", *, batch: int = 2, seq: int = 6, seed: int = 0, **config):
    """Hugging Face Whisper (encoder over 16 audio frames, causal decoder with cross-attention),
    1+1 layers, 4 heads, d=32."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    cfg = transformers.WhisperConfig(vocab_size=97, num_mel_bins=8, d_model=32, encoder_layers=1, decoder_layers=1,
                                     encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64,
                                     decoder_ffn_dim=64, max_source_positions=16, max_target_positions=32,
                                     pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=1,
                                     attn_implementation=attn_implementation, **config)
    g = torch.Generator().manual_seed(seed)
    return transformers.WhisperForConditionalGeneration(cfg), {
        "input_features": torch.randn(batch, 8, 32, generator=g), "decoder_input_ids": _ids(97, batch, seq, seed)}


def tiny_bart(attn_implementation: str = "sdpa", *, batch: int = 2, seq: int = 10, seed: int = 0, **config):
    """Hugging Face BART (encoder-decoder: self, causal self and cross-attention), 1+1 layers, 4 heads, d=32."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    cfg = transformers.BartConfig(vocab_size=97, d_model=32, encoder_layers=1, decoder_layers=1,
                                  encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64,
                                  decoder_ffn_dim=64, max_position_embeddings=64,
                                  attn_implementation=attn_implementation, **config)
    return transformers.BartForConditionalGeneration(cfg), {
        "input_ids": _ids(97, batch, seq, seed), "decoder_input_ids": _ids(97, batch, seq - 2, seed + 1)}


def tiny_distilbert(attn_implementation: str = "sdpa", *, batch: int = 2, seq: int = 10, seed: int = 0, **config):
    """Hugging Face DistilBERT (bidirectional, right padding on the second sample), 2 layers, 4 heads, d=32."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    config = {"n_layers": 2, **config}
    cfg = transformers.DistilBertConfig(vocab_size=97, dim=32, n_heads=4, hidden_dim=64,
                                        max_position_embeddings=64, attn_implementation=attn_implementation,
                                        **config)
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[1:, seq - 3:] = 0
    return transformers.DistilBertModel(cfg), {"input_ids": _ids(97, batch, seq, seed), "attention_mask": mask}
