"""The tiny checkpoints' model configs, per architecture (see :mod:`core.tiny`).

Gemma 1 / 2 / 3 (text and multimodal): :func:`_make_config`; Gemma 4 (dense
E-like, MoE, multimodal, unified): :func:`_make_gemma4_config`; Gemma 3n:
:func:`_make_gemma3n_config`. Each builds the real transformers config class
with every field explicit; :func:`_patch_config_json` then writes into
``config.json`` the keys the hub checkpoints carry and mlx-lm reads, but
transformers 5 no longer writes. ``transformers`` is imported inside the
functions.
"""

from __future__ import annotations

import json
from pathlib import Path

from .tokenizer import GEMMA3_ARCHS, is_gemma4, special_token_ids

#: Vision tower of the multimodal Gemma 3 checkpoint: 64 px images in 4 px patches
#: (16 x 16 patches) read as MM_TOKENS_PER_IMAGE = 256 soft tokens, the real
#: models' count (they read 896 px images in 14 px patches, 64 x 64, pooled 4 x 4).
IMAGE_SIZE = 64
PATCH_SIZE = 4
MM_TOKENS_PER_IMAGE = 256
#: Gemma 4's vision tower: 16 px patches pooled 3 x 3, as the real models; the
#: tiny processor's soft-token budget per image is the smallest real one (70).
GEMMA4_PATCH_SIZE = 16
GEMMA4_POOLING = 3
GEMMA4_IMAGE_SOFT_TOKENS = 70
#: Gemma 3n's processor size for the tiny checkpoint's images (the real one: 768 px; see
#: :mod:`core.tiny.gemma3n_towers` for why not smaller).
GEMMA3N_IMAGE_SIZE = 512
#: Gemma 3n's audio tower at tiny dims (the real one: 1536 wide, 12 conformer layers,
#: 8 heads, 128 / 32 subsampling channels); the 128 mel bins and the 4 x 4 time
#: reduction (one soft token per 160 ms) are the real ones.
GEMMA3N_AUDIO = dict(
    hidden_size=32,
    conf_num_attention_heads=2,
    conf_num_hidden_layers=1,
    sscp_conv_channel_size=[8, 8],
    input_feat_size=128,
)

#: Default model dimensions per arch (build_tiny_checkpoint's keyword arguments).
_GEMMA3_DIMS = dict(
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=1,
    head_dim=64,
)
_DIMS = {
    **dict.fromkeys(GEMMA3_ARCHS, _GEMMA3_DIMS),
    # E-like: 4 layers (sliding, full, sliding, full), the last 2 KV-shared.
    "gemma4_text": dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=32,
    ),
    "gemma4": dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=32,
    ),
    # 26B-A4B-like: 3 layers (sliding, sliding, full), MoE block in every layer.
    "gemma4_moe": dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
    ),
    # 12B-like (gemma4_unified): 3 layers (sliding, sliding, full), K=V global
    # attention with one global KV head; no per-layer embeddings, KV sharing or MoE.
    "gemma4_unified": dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
    ),
    # E-like Gemma 3n: 4 layers (sliding, full, sliding, full), the last 2 KV-shared.
    "gemma3n": dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=32,
    ),
}
# Gemma 4 specifics (see _make_gemma4_config).  The real models: head_dim 256,
# global_head_dim 512, per-layer input 256, sliding window 512 (E) / 1024.
_GEMMA4_GLOBAL_HEAD_DIM = {"gemma4_text": 64, "gemma4": 64, "gemma4_moe": 32, "gemma4_unified": 32}
_GEMMA4_SLIDING_WINDOW = 512
_GEMMA4_SOFTCAP = 30.0
_GEMMA4_PER_LAYER_INPUT = 64  # E models' hidden_size_per_layer_input (bnb needs %64)
_GEMMA4_KV_SHARED = 2
# 32 experts (real: 128, top 8): the fewest for which bitsandbytes' CPU 4-bit
# kernel can pack router.proj (it needs out_features % 32 == 0).
_GEMMA4_NUM_EXPERTS = 32
_GEMMA4_TOP_K = 4
_GEMMA4_MOE_INTERMEDIATE = 64  # expert width (real 704); MLX 4-bit needs %64
_GEMMA4_GLOBAL_KV_HEADS = 1
_GEMMA4_VISION_POSITIONS = 10240  # patch positions per side, as the real models
# Gemma 3: every 2nd layer global (the real models use 6; with 2 tiny layers
# that would make every layer local).
_SLIDING_WINDOW_PATTERN = 2
_GEMMA3_SLIDING_WINDOW = 512
_GEMMA2_SLIDING_WINDOW = 4096  # mlx-lm's gemma2 has no sliding window at all
_ROPE_GLOBAL = 1_000_000.0
_ROPE_LOCAL = 10_000.0


def _sliding_window_pattern(num_layers: int) -> int:
    # mlx-lm indexes the cache list with sliding_window_pattern - 1, so the
    # pattern may not exceed the number of layers (1 layer -> 1 global layer).
    return min(_SLIDING_WINDOW_PATTERN, num_layers)


def _layer_types(n: int, pattern: int) -> list[str]:
    return ["sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(n)]


def _make_config(arch: str, vocab_size: int, **dims):
    from transformers import (
        Gemma2Config,
        Gemma3Config,
        Gemma3TextConfig,
        GemmaConfig,
        SiglipVisionConfig,
    )

    n = dims["num_hidden_layers"]
    common = dict(
        vocab_size=vocab_size,
        pad_token_id=0,
        bos_token_id=2,
        eos_token_id=1,
        tie_word_embeddings=True,
        rms_norm_eps=1e-6,
        **dims,
    )
    if arch == "gemma":
        # mlx-lm's gemma.py uses exact (erf) GELU, transformers forces the tanh
        # approximation for Gemma 1 (it rewrites hidden_act="gelu" too): the
        # one difference between the two that no config field can remove.
        return GemmaConfig(
            hidden_act="gelu_pytorch_tanh",
            rope_parameters={"rope_type": "default", "rope_theta": _ROPE_LOCAL},
            **common,
        )
    if arch == "gemma2":
        return Gemma2Config(
            hidden_activation="gelu_pytorch_tanh",
            query_pre_attn_scalar=dims["head_dim"],
            sliding_window=_GEMMA2_SLIDING_WINDOW,
            layer_types=_layer_types(n, 2),
            attn_logit_softcapping=50.0,
            final_logit_softcapping=30.0,
            rope_parameters={"rope_type": "default", "rope_theta": _ROPE_LOCAL},
            **common,
        )
    text = Gemma3TextConfig(
        hidden_activation="gelu_pytorch_tanh",
        query_pre_attn_scalar=dims["head_dim"],
        sliding_window=_GEMMA3_SLIDING_WINDOW,
        # The legacy int; transformers keeps it only as "_sliding_window_pattern".
        sliding_window_pattern=_sliding_window_pattern(n),
        layer_types=_layer_types(n, _sliding_window_pattern(n)),
        rope_parameters={
            "full_attention": {"rope_type": "default", "rope_theta": _ROPE_GLOBAL},
            "sliding_attention": {"rope_type": "default", "rope_theta": _ROPE_LOCAL},
        },
        final_logit_softcapping=None,
        attn_logit_softcapping=None,
        **common,
    )
    if arch == "gemma3_text":
        return text
    ids = special_token_ids(arch, vocab_size)
    vision = SiglipVisionConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=IMAGE_SIZE,
        patch_size=PATCH_SIZE,
        vision_use_head=False,
        initializer_range=dims["initializer_range"],
    )
    return Gemma3Config(
        text_config=text,
        vision_config=vision,
        mm_tokens_per_image=MM_TOKENS_PER_IMAGE,
        boi_token_index=ids["<start_of_image>"],
        eoi_token_index=ids["<end_of_image>"],
        image_token_index=ids["<image_soft_token>"],
        initializer_range=dims["initializer_range"],
        tie_word_embeddings=True,
    )


def gemma4_media_token_fields(ids: dict[str, int]) -> dict[str, int]:
    """A Gemma 4 config's image / video / audio token ids, from ``special_token_ids``."""
    return {
        "boi_token_id": ids["<|image>"],
        "eoi_token_id": ids["<image|>"],
        "image_token_id": ids["<|image|>"],
        "video_token_id": ids["<|video|>"],
        "boa_token_id": ids["<|audio>"],
        "eoa_token_index": ids["<audio|>"],
        "audio_token_id": ids["<|audio|>"],
    }


def _gemma4_layer_types(arch: str, n: int) -> list[str]:
    # E-like: alternate (the KV-shared tail needs both kinds before it);
    # MoE and unified: full attention every 3rd layer.  The last layer is always full.
    pattern = 3 if arch in ("gemma4_moe", "gemma4_unified") else 2
    return _layer_types(n, min(pattern, n))


def _gemma4_text_config(arch: str, vocab_size: int, **dims):
    """A Gemma4TextConfig with every field explicit (mlx-lm's defaults differ)."""
    from transformers import Gemma4TextConfig

    n = dims["num_hidden_layers"]
    moe = arch == "gemma4_moe"
    per_layer = 0 if moe else _GEMMA4_PER_LAYER_INPUT
    shared = 0 if moe else min(_GEMMA4_KV_SHARED, max(n - 2, 0))
    return Gemma4TextConfig(
        vocab_size=vocab_size,
        pad_token_id=0,
        bos_token_id=2,
        eos_token_id=1,
        tie_word_embeddings=True,
        rms_norm_eps=1e-6,
        hidden_activation="gelu_pytorch_tanh",
        sliding_window=_GEMMA4_SLIDING_WINDOW,
        layer_types=_gemma4_layer_types(arch, n),
        rope_parameters={
            "full_attention": {
                "rope_type": "proportional",
                "partial_rotary_factor": 0.25,
                "rope_theta": _ROPE_GLOBAL,
            },
            "sliding_attention": {"rope_type": "default", "rope_theta": _ROPE_LOCAL},
        },
        final_logit_softcapping=_GEMMA4_SOFTCAP,
        attention_bias=False,
        # per-layer embeddings (E models)
        hidden_size_per_layer_input=per_layer,
        vocab_size_per_layer_input=vocab_size,
        # KV sharing and the double-wide MLP of the KV-shared layers (E models)
        num_kv_shared_layers=shared,
        use_double_wide_mlp=not moe,
        # MoE + K=V global attention (26B-A4B / 31B)
        enable_moe_block=moe,
        num_experts=_GEMMA4_NUM_EXPERTS if moe else None,
        top_k_experts=_GEMMA4_TOP_K if moe else None,
        moe_intermediate_size=_GEMMA4_MOE_INTERMEDIATE if moe else None,
        attention_k_eq_v=moe,
        global_head_dim=_GEMMA4_GLOBAL_HEAD_DIM[arch],
        num_global_key_value_heads=_GEMMA4_GLOBAL_KV_HEADS if moe else None,
        **dims,
    )


def _gemma4_unified_config(vocab_size: int, **dims):
    """A ``Gemma4UnifiedConfig`` (like gemma-4-12B): the encoder-free multimodal model.

    Its text model is Gemma 4's decoder without per-layer embeddings, KV
    sharing, double-wide MLP or MoE (the unified text config has no such
    fields; the hub's config.json still writes ``hidden_size_per_layer_input``
    0 and ``enable_moe_block`` false, which mlx-lm reads, so they are given
    here too), with K=V global attention and one global KV head. Images and
    audio enter through small embedders (LayerNorm / Dense / positions, and an
    RMSNorm + Linear), not towers: they are built here, tiny, so the
    checkpoint has the real layout; mlx-lm drops them on load.
    """
    from transformers import (
        Gemma4UnifiedAudioConfig,
        Gemma4UnifiedConfig,
        Gemma4UnifiedTextConfig,
        Gemma4UnifiedVisionConfig,
    )

    arch = "gemma4_unified"
    n = dims["num_hidden_layers"]
    text = Gemma4UnifiedTextConfig(
        vocab_size=vocab_size,
        pad_token_id=0,
        bos_token_id=2,
        eos_token_id=1,
        tie_word_embeddings=True,
        rms_norm_eps=1e-6,
        hidden_activation="gelu_pytorch_tanh",
        sliding_window=_GEMMA4_SLIDING_WINDOW,
        layer_types=_gemma4_layer_types(arch, n),
        rope_parameters={
            "full_attention": {
                "rope_type": "proportional",
                "partial_rotary_factor": 0.25,
                "rope_theta": _ROPE_GLOBAL,
            },
            "sliding_attention": {"rope_type": "default", "rope_theta": _ROPE_LOCAL},
        },
        final_logit_softcapping=_GEMMA4_SOFTCAP,
        attention_bias=False,
        attention_k_eq_v=True,
        num_kv_shared_layers=0,
        use_double_wide_mlp=False,
        use_bidirectional_attention="vision",
        global_head_dim=_GEMMA4_GLOBAL_HEAD_DIM[arch],
        num_global_key_value_heads=_GEMMA4_GLOBAL_KV_HEADS,
        hidden_size_per_layer_input=0,
        vocab_size_per_layer_input=vocab_size,
        enable_moe_block=False,
        num_experts=None,
        top_k_experts=None,
        moe_intermediate_size=None,
        **dims,
    )
    ids = special_token_ids(arch, vocab_size)
    init = dims["initializer_range"]
    # Real: 16 px patches merged 3 x 3 (48 px), mm_embed_dim = hidden 3840,
    # 1120 positions; audio: 640-sample frames.
    vision = Gemma4UnifiedVisionConfig(
        patch_size=8,
        pooling_kernel_size=2,
        mm_embed_dim=dims["hidden_size"],
        mm_posemb_size=16,
        output_proj_dims=dims["hidden_size"],
        rms_norm_eps=1e-6,
        initializer_range=init,
    )
    audio = Gemma4UnifiedAudioConfig(audio_embed_dim=32, rms_norm_eps=1e-6, initializer_range=init)
    return Gemma4UnifiedConfig(
        text_config=text,
        vision_config=vision,
        audio_config=audio,
        **gemma4_media_token_fields(ids),
        initializer_range=init,
        tie_word_embeddings=True,
    )


def _make_gemma4_config(arch: str, vocab_size: int, **dims):
    if arch == "gemma4_unified":
        return _gemma4_unified_config(vocab_size, **dims)
    if arch != "gemma4":
        return _gemma4_text_config(arch, vocab_size, **dims)
    from transformers import Gemma4AudioConfig, Gemma4Config, Gemma4VisionConfig

    ids = special_token_ids(arch, vocab_size)
    # One-layer vision and audio towers (the real E2B's: 16 vision layers,
    # hidden 768; 12 conformer layers, hidden 1024): cheap, so the checkpoint
    # has the real layout; mlx-lm drops them on load.
    vision = Gemma4VisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        head_dim=16,
        hidden_activation="gelu_pytorch_tanh",
        rms_norm_eps=1e-6,
        patch_size=GEMMA4_PATCH_SIZE,
        pooling_kernel_size=GEMMA4_POOLING,
        position_embedding_size=_GEMMA4_VISION_POSITIONS,
        use_clipped_linears=False,
        standardize=False,
        initializer_range=dims["initializer_range"],
    )
    # The real subsampling (two stride-2 convolutions over 128 mel bins) and
    # chunked local attention, narrow.
    audio = Gemma4AudioConfig(
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        # transformers sizes its projection as channels[0] // 4 x channels[1]: the
        # first count must be the 128 mel bins, as the real (128, 32).
        subsampling_conv_channels=[128, 4],
        output_proj_dims=32,
        # As the real E2B/E4B audio towers: every conformer linear has clip bounds
        # (transformers initialises them to +-inf, so they change nothing here), and
        # mlx-vlm's gemma4 audio tower always loads them.
        use_clipped_linears=True,
        initializer_range=dims["initializer_range"],
    )
    return Gemma4Config(
        text_config=_gemma4_text_config(arch, vocab_size, **dims),
        vision_config=vision,
        audio_config=audio,
        **gemma4_media_token_fields(ids),
        initializer_range=dims["initializer_range"],
        tie_word_embeddings=True,
    )


def _patch_config_json(path: Path, arch: str, dtype: str, vocab_size: int) -> None:
    """Write the keys real hub configs carry and mlx-lm reads, but transformers 5 omits.

    mlx-lm builds its ModelArgs from config.json with its *own* defaults for
    missing keys, and several differ from transformers' (gemma3_text:
    sliding_window_pattern 6 -- with 2 layers that even crashes --, gemma2:
    query_pre_attn_scalar 144, gemma3: top-level vocab_size 262208), so every
    field that matters is written out explicitly.
    """
    file = path / "config.json"
    cfg = json.loads(file.read_text(encoding="utf-8"))
    cfg["torch_dtype"] = dtype  # pre-v5 key; mlx_lm.convert reads only this one
    text = cfg.get("text_config", cfg)
    if arch == "gemma3":
        cfg["vocab_size"] = vocab_size  # mlx-lm copies it into text_config
        text["torch_dtype"] = dtype
    if arch in ("gemma3", "gemma3_text"):
        text.pop("_sliding_window_pattern", None)
        text["sliding_window_pattern"] = _sliding_window_pattern(text["num_hidden_layers"])
        text["rope_theta"] = _ROPE_GLOBAL
        text["rope_local_base_freq"] = _ROPE_LOCAL
        text["rope_scaling"] = None
    elif is_gemma4(arch):
        _patch_gemma4_text(text)
        if arch in ("gemma4", "gemma4_unified"):
            cfg["vocab_size"] = vocab_size  # mlx-lm copies it into text_config
            text["torch_dtype"] = dtype
    elif arch == "gemma3n":
        # mlx-lm's gemma3n TextConfig has these as required fields.
        text["rope_theta"] = _ROPE_GLOBAL
        text["rope_local_base_freq"] = _ROPE_LOCAL
        text["rope_scaling"] = None
        text["torch_dtype"] = dtype
    else:
        text["rope_theta"] = _ROPE_LOCAL
    file.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _make_gemma3n_config(vocab_size: int, **dims):
    """The text config of the tiny Gemma 3n (E-like), every field explicit."""
    from transformers import Gemma3nTextConfig

    n = dims["num_hidden_layers"]
    return Gemma3nTextConfig(
        vocab_size=vocab_size,
        vocab_size_per_layer_input=vocab_size,
        pad_token_id=0,
        bos_token_id=2,
        eos_token_id=1,
        tie_word_embeddings=True,
        rms_norm_eps=1e-6,
        hidden_activation="gelu_pytorch_tanh",
        sliding_window=_GEMMA4_SLIDING_WINDOW,
        layer_types=_layer_types(n, min(2, n)),
        rope_parameters={
            "full_attention": {"rope_type": "default", "rope_theta": _ROPE_GLOBAL},
            "sliding_attention": {"rope_type": "default", "rope_theta": _ROPE_LOCAL},
        },
        final_logit_softcapping=_GEMMA4_SOFTCAP,
        hidden_size_per_layer_input=_GEMMA4_PER_LAYER_INPUT,
        num_kv_shared_layers=min(_GEMMA4_KV_SHARED, max(n - 2, 0)),
        # The real E2B/E4B: the first 10 layers keep the top 5% of the gate
        # activations (gelu_topk); here the first layer.
        activation_sparsity_pattern=[0.95] + [0.0] * (n - 1),
        altup_num_inputs=4,
        altup_active_idx=0,
        altup_coef_clip=120.0,
        altup_correct_scale=True,
        laurel_rank=64,
        attention_bias=False,
        **dims,
    )


def _patch_gemma4_text(text: dict) -> None:
    """The Gemma 4 keys mlx-lm reads from the top of the text config.

    transformers keeps ``global_head_dim`` / ``num_global_key_value_heads`` only
    inside ``per_layer_config``; mlx-lm reads them from the top (defaults 512 /
    None), and derives nothing from ``per_layer_config``.
    """
    full = [o for o in text.get("per_layer_config", {}).values() if "head_dim" in o]
    text["global_head_dim"] = full[0]["head_dim"] if full else text["head_dim"]
    kv = {o.get("num_key_value_heads") for o in full} - {None}
    text["num_global_key_value_heads"] = kv.pop() if kv else None
    # Unused by mlx-lm when layer_types is given, but its default (5) would
    # describe another model; this is the tiny one's pattern.
    types = text["layer_types"]
    text["sliding_window_pattern"] = types.index("full_attention") + 1
    text["global_partial_rotary_factor"] = text["rope_parameters"]["full_attention"][
        "partial_rotary_factor"
    ]
    # The rest of mlx-lm's ModelArgs, explicit (the per-layer-type RoPE is in
    # rope_parameters; these two only describe it).
    text["partial_rotary_factor"] = 1.0
    text["rope_traditional"] = False
