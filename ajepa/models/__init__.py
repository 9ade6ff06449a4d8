"""A-JEPA model modules: spectrogram ViT encoder, predictor, regularized masking, A-JEPA wiring."""
from .ajepa import AJEPA, effective_rank
from .attention import KeyMaskAttention, KeyMaskBlock, random_key_mask
from .vit import (SIZES, Predictor, SpectrogramEncoder, gather_tokens, init_vit_weights, resolve_size,
                  sincos_pos_embed_2d)

__all__ = ["AJEPA", "effective_rank", "KeyMaskAttention", "KeyMaskBlock", "random_key_mask", "SIZES", "Predictor",
           "SpectrogramEncoder", "gather_tokens", "init_vit_weights", "resolve_size", "sincos_pos_embed_2d"]
