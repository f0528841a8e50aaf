"""Vision and audio towers for the tiny Gemma 3n: :func:`add_gemma3n_towers` (see :mod:`core.tiny`).

The ``gemma3n`` checkpoint that :func:`~core.tiny.build_tiny_checkpoint` writes holds
text weights only. This adds what mlx-vlm's ``gemma3n`` model reads besides them,
in the real checkpoints' layout (``model.vision_tower.timm_model.*``,
``model.audio_tower.*``, ``model.embed_vision.*``, ``model.embed_audio.*``, PyTorch
conv layouts), and the real processor files (``Gemma3nProcessor``: a SigLIP image
processor and the 128-bin mel feature extractor):

* the **audio tower** is transformers' own ``Gemma3nAudioEncoder`` at tiny dims
  (:data:`~core.tiny.configs.GEMMA3N_AUDIO`); it needs nothing beyond torch;
* the **vision tower** cannot be tiny: mlx-vlm 0.7.10 builds the MobileNetV5-300M
  encoder from a fixed block list (``gemma3n_mobilenet_def``, 294M parameters)
  whatever the config says, and transformers builds it only through ``timm``,
  which cannot be installed here (it imports torchvision). Its weights are drawn
  here at that size, names and shapes taken from mlx-vlm's module, stored as
  bfloat16 (~590 MB). Reading one 512 px image with it takes about two minutes
  on a two-core CPU, so the tests send this checkpoint audio only;
* the image processor resizes to 512 px (the real one: 768), the smallest size
  at which mlx-vlm's tower pools its last feature map to the 16 x 16 soft tokens
  correctly (at 256 px it skips the pooling and returns the channels in another
  order; at 64 px it fails).

transformers cannot load this checkpoint's towers (``Gemma3nForConditionalGeneration``
needs timm); ``Gemma3nForCausalLM`` still loads its text weights. ``torch``,
``transformers``, ``numpy`` and ``mlx_vlm`` are imported inside the function.
"""

from __future__ import annotations

from pathlib import Path

from .configs import GEMMA3N_IMAGE_SIZE
from .tokenizer import build_tokenizer


def _vision_weights(seed: int) -> dict:
    """The MobileNetV5 tower's weights, random, named and laid out as the hub's
    (``vision_tower.timm_model.*``, convolutions ``(out, in, kh, kw)``), bfloat16."""
    import numpy as np
    import torch
    from mlx.utils import tree_flatten
    from mlx_vlm.models.gemma3n.config import VisionConfig
    from mlx_vlm.models.gemma3n.vision import VisionModel

    rng = np.random.default_rng(seed)
    weights = {}
    for name, value in tree_flatten(VisionModel(VisionConfig()).parameters()):
        shape = tuple(value.shape)
        if len(shape) >= 2:  # convolutions (out, kh, kw, in) and linears: N(0, 1/fan_in)
            fan_in = int(np.prod(shape[1:]))
            array = rng.standard_normal(shape, dtype=np.float32) / np.sqrt(fan_in)
        else:  # norm scales (ones), biases (zeros), layer scales: as initialised
            array = np.array(value, dtype=np.float32)
        if len(shape) == 4:
            # mlx-vlm's sanitize transposes these back (it checks "conv"/"proj.weight").
            if not ("conv" in name or "proj.weight" in name):
                raise AssertionError(f"mlx-vlm would not transpose {name}")
            array = array.transpose(0, 3, 1, 2)
        weights["model.vision_tower." + name] = torch.from_numpy(np.ascontiguousarray(array)).to(
            torch.bfloat16
        )
    return weights


def _torch_towers(config, text_config, seed: int, dtype) -> dict:
    """transformers' audio encoder and both multimodal embedders, random."""
    import torch
    from transformers.models.gemma3n.modeling_gemma3n import (
        Gemma3nAudioEncoder,
        Gemma3nMultimodalEmbedder,
    )

    weights = {}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        modules = {
            "audio_tower": Gemma3nAudioEncoder(config.audio_config),
            "embed_audio": Gemma3nMultimodalEmbedder(config.audio_config, text_config),
            "embed_vision": Gemma3nMultimodalEmbedder(config.vision_config, text_config),
        }
        gen = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            for module in modules.values():
                for name, param in module.named_parameters():
                    if name.endswith("norm.weight"):  # random scales around one
                        param.copy_(1.0 + 0.5 * torch.randn(param.shape, generator=gen))
    for prefix, module in modules.items():
        for name, tensor in module.state_dict().items():
            weights[f"model.{prefix}.{name}"] = tensor.to(dtype).contiguous()
    return weights


def _save_processor(path: Path) -> None:
    """``Gemma3nProcessor``'s files: SigLIP image processor (PIL backend, no torchvision),
    the mel feature extractor, the real soft-token counts (256 per image, 188 per clip)."""
    from transformers import (
        AutoTokenizer,
        Gemma3nAudioFeatureExtractor,
        Gemma3nProcessor,
        SiglipImageProcessorPil,
    )

    tokenizer = AutoTokenizer.from_pretrained(str(path))
    processor = Gemma3nProcessor(
        feature_extractor=Gemma3nAudioFeatureExtractor(),
        image_processor=SiglipImageProcessorPil(
            size={"height": GEMMA3N_IMAGE_SIZE, "width": GEMMA3N_IMAGE_SIZE},
            image_mean=[0.0, 0.0, 0.0],
            image_std=[1.0, 1.0, 1.0],
        ),
        tokenizer=tokenizer,
        chat_template=tokenizer.chat_template,
        audio_seq_length=188,
        image_seq_length=256,
    )
    processor.save_pretrained(str(path))


def add_gemma3n_towers(path, *, seed: int = 0) -> Path:
    """Add the vision and audio towers and the processor to the tiny ``gemma3n``
    checkpoint at ``path`` (built by ``build_tiny_checkpoint(path, "gemma3n")``)."""
    from safetensors.torch import load_file, save_file
    from transformers import Gemma3nConfig

    path = Path(path)
    config = Gemma3nConfig.from_pretrained(str(path))
    if config.model_type != "gemma3n":
        raise ValueError(f"{path} is not a gemma3n checkpoint (model_type {config.model_type!r})")
    file = path / "model.safetensors"
    weights = load_file(str(file))
    if any(".audio_tower." in k or ".vision_tower." in k for k in weights):
        raise ValueError(f"{path} already holds towers")
    dtype = next(iter(weights.values())).dtype
    weights.update(_torch_towers(config, config.text_config, seed, dtype))
    weights.update(_vision_weights(seed))
    save_file(weights, str(file), metadata={"format": "pt"})
    del weights

    # Saving a processor also writes the tokenizer files; write the finished ones again.
    vocab_size = config.text_config.vocab_size
    _save_processor(path)
    build_tokenizer(path, arch="gemma3n", vocab_size=vocab_size)
    return path
