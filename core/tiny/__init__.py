"""Tiny random-weight Gemma checkpoints, built offline.

Tests (and anyone without access to the model hub) use these to exercise the
real loading code: ``AutoTokenizer`` / ``AutoModelForCausalLM.from_pretrained``,
``mlx_lm.load``, ``mlx_lm.convert`` and bitsandbytes 4-bit loading.  Nothing here
downloads anything.

The checkpoints mimic the real Gemma releases where it matters to a loader:

* the tokenizer is a Gemma-style BPE (``GemmaTokenizer``: spaces become ``▁``,
  byte fallback, the same normalizer / decoder as the real ``tokenizer.json``)
  with the special tokens at Gemma's real ids (``<pad>`` 0, ``<eos>`` 1,
  ``<bos>`` 2, ``<unk>`` 3, ``<mask>`` 4, ``<start_of_turn>`` 105,
  ``<end_of_turn>`` 106), a post-processor that prepends ``<bos>``, and the
  real chat template.  Characters outside a small alphabet (CJK, emoji) are
  encoded one token per UTF-8 byte, so streaming detokenizers see split
  multi-byte characters;
* ``config.json`` comes from the real transformers config classes, plus the
  keys the hub checkpoints carry and mlx-lm reads but transformers 5 no longer
  writes (see :func:`.configs._patch_config_json`);
* ``generation_config.json`` stops on ``[<eos>, <end_of_turn>]`` like Gemma 3.

Gemma 4 (:data:`GEMMA4_ARCHS`) and Gemma 3n follow their own releases:

* ``gemma4_text``: dense and E-like (gemma-4-E2B/E4B): per-layer embeddings,
  the last two of four layers KV-shared with a double-wide MLP, a global
  (full-attention) head dim twice the sliding one, proportional RoPE;
  ``gemma4_moe``: ``model_type`` ``gemma4_text`` with ``enable_moe_block`` (32
  experts, top 4) and ``attention_k_eq_v`` with one global KV head (like
  26B-A4B / 31B); ``gemma4``: the multimodal ``Gemma4ForConditionalGeneration``
  with one-layer vision and audio towers and the real processor configs (16 px
  patches pooled 3 x 3, a 70-token image budget, the 128-bin mel feature
  extractor), like E2B/E4B;
* ``gemma3`` reads a 64 px image as 256 soft tokens (4 px patches), as the real
  Gemma 3 reads 896 px; its ``Gemma3Processor`` loads with ``AutoProcessor``;
* ``gemma4_unified`` (like gemma-4-12B): ``Gemma4UnifiedForConditionalGeneration``,
  the encoder-free multimodal model (small vision / audio embedders, no towers,
  no processor: its image processor needs torchvision) used for text; three
  layers (sliding, sliding, full), ``attention_k_eq_v`` with one global KV head,
  no per-layer embeddings, KV sharing or MoE. mlx-lm loads it with its ``gemma4``
  module (``MODEL_REMAPPING``);
* the Gemma 4 tokenizer has every control token at its real id
  (:data:`GEMMA4_SPECIAL_TOKENS`), the media tokens at the last ids,
  ``add_bos_token`` false and left padding, and the real Gemma 4 template;
  generation stops on ``[<eos>, <turn|>, <|tool_response>]``;
* ``gemma3n`` is laid out like the real (multimodal) Gemma 3n checkpoints but
  holds text weights only: mlx-lm loads it, transformers loads it with
  ``Gemma3nForCausalLM`` (``AutoModelForCausalLM`` builds the full model,
  whose vision tower needs ``timm``).  Gemma 3 tokenizer and stop ids, the
  Gemma 3n template, its six media tokens at the last ids;
  :func:`.gemma3n_towers.add_gemma3n_towers` adds the towers mlx-vlm reads (a
  tiny audio tower, the full-size MobileNetV5 vision tower) and the processor;
* their ``config.json`` writes every field mlx-lm reads, because mlx-lm's
  defaults are those of the real models (see :func:`.configs._patch_gemma4_text`).

Layout: :mod:`.tokenizer` (the archs, special tokens, chat templates and the
BPE tokenizer), :mod:`.configs` (the model config of each architecture and the
``config.json`` patches), :mod:`.checkpoint` (random weights, saving, and
:func:`build_tiny_checkpoint`). Everything public is re-exported here.

Heavy libraries (torch, transformers, tokenizers) are imported lazily, inside
the functions, so importing this package is cheap.
"""

from .checkpoint import build_tiny_checkpoint, build_tiny_gemma4_assistant
from .configs import (
    GEMMA4_IMAGE_SOFT_TOKENS,
    GEMMA4_PATCH_SIZE,
    GEMMA4_POOLING,
    IMAGE_SIZE,
    MM_TOKENS_PER_IMAGE,
    PATCH_SIZE,
)
from .tokenizer import (
    ARCHS,
    EOS_TOKEN_IDS,
    GEMMA3_ARCHS,
    GEMMA4_ARCHS,
    GEMMA4_EOS_TOKEN_IDS,
    GEMMA4_MEDIA_TOKENS,
    GEMMA4_NAMED_TOKENS,
    GEMMA4_SPECIAL_TOKENS,
    IMAGE_TOKENS,
    SPECIAL_TOKENS,
    build_tokenizer,
    chat_template,
    eos_token_ids,
    is_gemma4,
    special_token_ids,
)

__all__ = [
    "ARCHS",
    "EOS_TOKEN_IDS",
    "GEMMA3_ARCHS",
    "GEMMA4_ARCHS",
    "GEMMA4_EOS_TOKEN_IDS",
    "GEMMA4_IMAGE_SOFT_TOKENS",
    "GEMMA4_MEDIA_TOKENS",
    "GEMMA4_NAMED_TOKENS",
    "GEMMA4_PATCH_SIZE",
    "GEMMA4_POOLING",
    "GEMMA4_SPECIAL_TOKENS",
    "IMAGE_SIZE",
    "IMAGE_TOKENS",
    "MM_TOKENS_PER_IMAGE",
    "PATCH_SIZE",
    "SPECIAL_TOKENS",
    "build_tiny_checkpoint",
    "build_tiny_gemma4_assistant",
    "build_tokenizer",
    "chat_template",
    "eos_token_ids",
    "is_gemma4",
    "special_token_ids",
]
