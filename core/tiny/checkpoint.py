"""Building a tiny random-weight checkpoint: :func:`build_tiny_checkpoint` (see
:mod:`core.tiny`).

The config comes from :mod:`.configs`, the tokenizer from :mod:`.tokenizer`;
here the weights are drawn (random norm scales, router scales, q/k gain, see
:data:`_INIT_STD` and :data:`_QK_GAIN`), saved through ``save_pretrained`` (or
in the real Gemma 3n layout), and ``generation_config.json``, the tokenizer
and, for ``gemma3`` and ``gemma4``, the processor are written beside them. ``torch`` and
``transformers`` are imported inside the functions.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from .configs import (
    _DIMS,
    GEMMA3N_AUDIO,
    GEMMA4_IMAGE_SOFT_TOKENS,
    GEMMA4_PATCH_SIZE,
    GEMMA4_POOLING,
    IMAGE_SIZE,
    MM_TOKENS_PER_IMAGE,
    _make_config,
    _make_gemma3n_config,
    _make_gemma4_config,
    _patch_config_json,
)
from .tokenizer import (
    GEMMA3_ARCHS,
    _check_arch,
    _make_tokenizer,
    build_tokenizer,
    eos_token_ids,
    is_gemma4,
    special_token_ids,
)

_DTYPES = ("float32", "bfloat16", "float16")
# Default init std per arch.  Gemma 1 has no post-attention / post-MLP norms,
# so with std 0.02 the (scaled) token embedding dominates the residual stream
# and greedy decoding just repeats the last prompt token; 0.2 gives varied output.
_INIT_STD = {
    "gemma3_text": 0.02,
    "gemma3": 0.02,
    "gemma2": 0.02,
    "gemma": 0.2,
    "gemma4_text": 0.02,
    "gemma4_moe": 0.02,
    "gemma4": 0.02,
    "gemma4_unified": 0.02,
    "gemma3n": 0.05,  # 0.02 decodes greedily into one repeated token
}
# Gemma 2 has no q/k RMSNorm (Gemma 3 does): with std 0.02 its attention is
# nearly uniform and greedy decoding repeats one token.  Scaling q_proj and
# k_proj gives sharp attention (and large enough scores to exercise the
# attn_logit_softcapping of 50).
_QK_GAIN = {"gemma2": 10.0}


def _save_processor(path: Path, tokenizer) -> None:
    """Image processor + Gemma3Processor for the multimodal checkpoint."""
    # The PIL backend: the default Gemma3ImageProcessor needs torchvision.
    from transformers import Gemma3ImageProcessorPil, Gemma3Processor

    image_processor = Gemma3ImageProcessorPil(
        size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
    )
    processor = Gemma3Processor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        chat_template=tokenizer.chat_template,
        image_seq_length=MM_TOKENS_PER_IMAGE,
    )
    processor.save_pretrained(str(path))


def _save_gemma4_processor(path: Path) -> None:
    """``processor_config.json`` of the multimodal Gemma 4 checkpoint, as the real ones hold it.

    Written by hand: ``Gemma4Processor`` cannot be built here, because its video
    processor needs torchvision. The image processor and audio feature
    extractor are the real classes' (their PIL / numpy backends need neither
    torchvision nor torchaudio); :mod:`core.transformers_media` loads them
    without the video processor. No ``video_processor`` entry: gemma-local
    takes no video.
    """
    import json

    from transformers import Gemma4AudioFeatureExtractor, Gemma4ImageProcessorPil

    image = Gemma4ImageProcessorPil(
        patch_size=GEMMA4_PATCH_SIZE,
        pooling_kernel_size=GEMMA4_POOLING,
        max_soft_tokens=GEMMA4_IMAGE_SOFT_TOKENS,
    )
    image_config = json.loads(image.to_json_string())
    image_config["image_processor_type"] = "Gemma4ImageProcessor"  # the real name
    config = {
        "processor_class": "Gemma4Processor",
        "image_seq_length": GEMMA4_IMAGE_SOFT_TOKENS,
        "audio_seq_length": 750,
        "audio_ms_per_token": 40,
        "image_processor": image_config,
        "feature_extractor": json.loads(Gemma4AudioFeatureExtractor().to_json_string()),
    }
    (path / "processor_config.json").write_text(
        json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8"
    )


def _save_gemma3n(path: Path, model, dtype: str) -> None:
    """Save a Gemma3nForCausalLM as the real (multimodal) Gemma 3n checkpoints are laid out.

    ``config.json`` is a ``gemma3n`` config (text + the vision / audio configs
    of :mod:`.gemma3n_towers`, whose weights that module adds), the weights sit
    under ``model.language_model.``, and the KV-shared layers keep their own
    (unused) k/v projections and k-norm as in the published files: mlx-lm's
    gemma3n loads them strictly, transformers ignores them.
    """
    import torch
    from safetensors.torch import save_file
    from transformers import Gemma3nAudioConfig, Gemma3nConfig, Gemma3nVisionConfig

    text = model.config
    gen = torch.Generator().manual_seed(1234)
    weights = {}
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight":  # tied to the embedding
            continue
        weights["model.language_model." + name.removeprefix("model.")] = tensor
    kv_dim = text.num_key_value_heads * text.head_dim
    for i, layer in enumerate(model.model.layers):
        if not layer.self_attn.is_kv_shared_layer:
            continue
        prefix = f"model.language_model.layers.{i}.self_attn."
        std = text.initializer_range
        for proj in ("k_proj", "v_proj"):
            w = torch.randn((kv_dim, text.hidden_size), generator=gen) * std
            weights[prefix + proj + ".weight"] = w.to(model.dtype)
        weights[prefix + "k_norm.weight"] = torch.ones(text.head_dim, dtype=model.dtype)
    save_file(
        {k: v.contiguous() for k, v in weights.items()},
        str(path / "model.safetensors"),
        metadata={"format": "pt"},
    )
    # The media tokens are the vocabulary's last six ids (see GEMMA3N_MEDIA_TOKENS): the
    # vision range starts at <end_of_image>, the audio range at <end_of_audio>, two ids
    # each (the real ones: 128 each). The towers' weights come from add_gemma3n_towers.
    ids = special_token_ids("gemma3n", text.vocab_size)
    config = Gemma3nConfig(
        text_config=text,
        vision_config=Gemma3nVisionConfig(vocab_size=2, vocab_offset=ids["<end_of_image>"]),
        audio_config=Gemma3nAudioConfig(
            vocab_size=2, vocab_offset=ids["<end_of_audio>"], **GEMMA3N_AUDIO
        ),
        boi_token_id=ids["<start_of_image>"],
        eoi_token_id=ids["<end_of_image>"],
        image_token_id=ids["<image_soft_token>"],
        boa_token_id=ids["<start_of_audio>"],
        eoa_token_id=ids["<end_of_audio>"],
        audio_token_id=ids["<audio_soft_token>"],
        initializer_range=text.initializer_range,
        tie_word_embeddings=True,
    )
    config.architectures = ["Gemma3nForConditionalGeneration"]
    config.dtype = dtype
    config.save_pretrained(str(path))


def _hub_siglip_layout(path: Path) -> None:
    """Gemma 3's vision weights under ``vision_tower.vision_model.``, as the hub's checkpoints
    (and ``mlx_vlm.convert``'s) hold them.

    transformers 5's ``SiglipVisionModel`` has no ``vision_model`` level and saves
    ``vision_tower.embeddings...``; it loads either (it drops that prefix on load),
    but mlx-vlm's gemma3 reads the hub's names only.
    """
    from safetensors.torch import load_file, save_file

    file = path / "model.safetensors"
    weights = load_file(str(file))
    renamed = {
        "vision_tower.vision_model." + k.removeprefix("vision_tower.")
        if k.startswith("vision_tower.") and not k.startswith("vision_tower.vision_model.")
        else k: v
        for k, v in weights.items()
    }
    save_file(renamed, str(file), metadata={"format": "pt"})


def build_tiny_checkpoint(
    path,
    arch: str = "gemma3_text",
    *,
    dtype: str = "float32",
    seed: int = 0,
    vocab_size: int = 512,
    hidden_size: int | None = None,
    intermediate_size: int | None = None,
    num_hidden_layers: int | None = None,
    num_attention_heads: int | None = None,
    num_key_value_heads: int | None = None,
    head_dim: int | None = None,
    max_position_embeddings: int = 2048,
    initializer_range: float | None = None,
    norm_std: float | None = None,
) -> Path:
    """Build a random-weight Gemma checkpoint of ``arch`` in ``path``; return the path.

    ``arch`` is one of :data:`ARCHS`.  ``path`` is emptied first.  Writes
    ``config.json``, ``model.safetensors`` (``save_pretrained``),
    ``generation_config.json`` and the tokenizer files (and, for ``gemma3``,
    ``processor_config.json`` + the image processor; for ``gemma4``, the image
    processor and the audio feature extractor).  The model dimensions
    default per arch (Gemma 1-3: hidden 128, 2 layers; Gemma 4 / 3n: hidden 64,
    3-4 layers); ``None`` means that default.  ``initializer_range`` is the std
    of the random Linear/Embedding weights (default per arch, see _INIT_STD);
    ``norm_std`` the spread of the random RMSNorm scales (default 1.0 for Gemma
    1-3, whose norms scale by ``1 + w`` with ``w`` ~ N(0, norm_std); 0.5 for
    Gemma 4 / 3n, whose norms scale by ``w`` ~ 1 + N(0, norm_std)).
    """
    _check_arch(arch)
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {_DTYPES}, not {dtype!r}")
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    given = dict(
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads,
        num_key_value_heads=num_key_value_heads,
        head_dim=head_dim,
    )
    dims = {k: _DIMS[arch][k] if v is None else v for k, v in given.items()}
    if initializer_range is None:
        initializer_range = _INIT_STD[arch]
    scale_norms_by_w = arch not in GEMMA3_ARCHS  # Gemma 4 / 3n: x * w, not x * (1 + w)
    if norm_std is None:
        norm_std = 0.5 if scale_norms_by_w else 1.0
    path = Path(path)
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)

    if is_gemma4(arch):
        config = _make_gemma4_config(
            arch,
            vocab_size,
            max_position_embeddings=max_position_embeddings,
            initializer_range=initializer_range,
            **dims,
        )
    elif arch == "gemma3n":
        config = _make_gemma3n_config(
            vocab_size,
            max_position_embeddings=max_position_embeddings,
            initializer_range=initializer_range,
            **dims,
        )
    else:
        config = _make_config(
            arch,
            vocab_size,
            max_position_embeddings=max_position_embeddings,
            initializer_range=initializer_range,
            **dims,
        )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    gen = torch.Generator().manual_seed(seed + 1)

    def around_one(shape) -> torch.Tensor:
        return 1.0 + torch.randn(shape, generator=gen) * norm_std

    with torch.no_grad():
        for name, param in model.named_parameters():
            towers = "vision_tower" in name or "audio_tower" in name
            # Random norm scales make greedy decoding much less repetitive and
            # check that every backend applies the right scaling.
            if norm_std and name.endswith("norm.weight") and not towers:
                if scale_norms_by_w:
                    param.copy_(around_one(param.shape))
                else:
                    param.copy_(torch.randn(param.shape, generator=gen) * norm_std)
            # Ones by default: random, so that a backend that ignores them shows.
            elif name.endswith(("router.scale", "router.per_expert_scale", "correct_output_scale")):
                param.copy_(around_one(param.shape))
            # Zero-initialised by transformers: images would have no effect.
            elif name.endswith("mm_input_projection_weight"):
                param.copy_(torch.randn(param.shape, generator=gen) * initializer_range)
            elif name.endswith(("q_proj.weight", "k_proj.weight")) and not towers:
                param.mul_(_QK_GAIN.get(arch, 1.0))
        for name, buf in model.named_buffers():
            # Gemma 4's per-layer output scale (a saved buffer, ones by default).
            if name.endswith("layer_scalar"):
                buf.copy_(torch.rand(buf.shape, generator=gen) + 0.5)
    model = model.to(getattr(torch, dtype))
    model.config.dtype = dtype

    if arch == "gemma3n":
        _save_gemma3n(path, model, dtype)
    else:
        _save_quietly(model, path)
        if arch == "gemma3":
            _hub_siglip_layout(path)
    _patch_config_json(path, arch, dtype, vocab_size)

    generation = GenerationConfig(
        bos_token_id=2, eos_token_id=list(eos_token_ids(arch)), pad_token_id=0
    )
    if arch != "gemma2" and arch != "gemma":
        # The real Gemma 3 / 3n / 4 defaults: sampling unless the caller says otherwise.
        generation.do_sample = True
        generation.top_k = 64
        generation.top_p = 0.95
        if is_gemma4(arch):
            generation.temperature = 1.0
    generation.save_pretrained(str(path))

    if arch == "gemma3":
        # First: saving a processor also writes the tokenizer files, which
        # build_tokenizer then overwrites with the finished ones.
        _save_processor(path, _make_tokenizer(arch, vocab_size))
    build_tokenizer(path, arch=arch, vocab_size=vocab_size)
    if arch == "gemma4":
        _save_gemma4_processor(path)
    return path


def build_tiny_gemma4_assistant(path, target, *, seed: int = 0, num_hidden_layers: int = 2) -> Path:
    """Build a random-weight Gemma 4 assistant (``gemma4_assistant``, the drafter Google
    releases beside each Gemma 4 model) for the tiny Gemma 4 checkpoint ``target``; return
    ``path``.

    Its layers are a sliding and a full-attention one (then alternating), each with the
    target's head dims and every layer KV-shared, as the assistant reads the target's own
    keys and values; ``backbone_hidden_size`` is the target's hidden size. Weights only:
    the assistant uses the target's tokenizer. ``generation_config.json`` names no
    ``num_assistant_tokens`` (what a client does then is its choice).
    """
    import torch
    from transformers import AutoConfig, Gemma4TextConfig
    from transformers.models.gemma4_assistant import (
        Gemma4AssistantConfig,
        Gemma4AssistantForCausalLM,
    )

    text = AutoConfig.from_pretrained(str(target)).get_text_config().to_dict()
    for key in ("model_type", "transformers_version", "architectures", "dtype", "torch_dtype"):
        text.pop(key, None)
    sliding = text["layer_types"].index("sliding_attention")
    full = text["layer_types"].index("full_attention")
    per_layer = text.get("per_layer_config") or {}
    types, overrides = [], {}
    for i in range(num_hidden_layers):
        source = sliding if i % 2 == 0 else full
        types.append(text["layer_types"][source])
        if str(source) in per_layer:
            overrides[str(i)] = per_layer[str(source)]
    text.update(
        num_hidden_layers=num_hidden_layers,
        layer_types=types,
        per_layer_config=overrides or None,
        intermediate_size=text["hidden_size"],
        hidden_size_per_layer_input=0,
        vocab_size_per_layer_input=0,
        num_kv_shared_layers=num_hidden_layers,
        use_double_wide_mlp=False,
        enable_moe_block=False,
    )
    config = Gemma4AssistantConfig(
        text_config=Gemma4TextConfig(**text), backbone_hidden_size=text["hidden_size"]
    )
    torch.manual_seed(seed)
    model = Gemma4AssistantForCausalLM(config).eval()
    path = Path(path)
    if path.exists():
        shutil.rmtree(path)
    _save_quietly(model, path)
    return path


def _save_quietly(model, path: Path) -> None:
    """``model.save_pretrained(path)`` without transformers' progress bar."""
    from transformers.utils import logging as hf_logging

    progress_bar = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        model.save_pretrained(str(path))
    finally:
        if progress_bar:
            hf_logging.enable_progress_bar()
