"""A-JEPA model modules: spectrogram ViT encoder, predictor, regularized masking, A-JEPA wiring."""
from .ajepa import AJEPA, PositionOnlyPredictor, effective_rank, sigreg
from .attention import KeyMaskBlock, random_key_mask
from .vit import (
                  SIZES,
                  Predictor,
                  SpectrogramEncoder,
                  gather_tokens,
                  init_vit_weights,
                  pool_tokens,
                  resolve_size,
                  set_activation_checkpointing,
                  sincos_pos_embed_2d,
                  time_patch_embeddings,
)

__all__ = ["AJEPA", "PositionOnlyPredictor", "effective_rank", "sigreg", "KeyMaskBlock", "random_key_mask", "SIZES",
           "Predictor", "pool_tokens",
           "SpectrogramEncoder", "gather_tokens", "init_vit_weights", "resolve_size", "set_activation_checkpointing",
           "sincos_pos_embed_2d", "time_patch_embeddings"]
