"""Images and audio on the transformers backend: the checkpoint's own processor, and the
tensors ``generate`` reads with a batch of prompts.

Data flow (on the model thread)::

    rendered prompt text + decoded media (core.media)
        ──load_processor(checkpoint) once──▶ Gemma3Processor / Gemma4Processor / ...
        ──encode(processor, text, media, options)──▶ ids (soft tokens expanded) + MediaInputs
    Prompt.media of each row ──merge(prompts, width)──▶ pixel_values, token type ids,
        audio features for model.generate (rows without media get zeros)

The processor is what the model was trained with: ``AutoProcessor`` picks it
from the checkpoint (its image processor on the PIL backend when torchvision
is missing). ``Gemma4Processor`` cannot be built without torchvision (its
video processor needs it), so for Gemma 4 the same class is built without
its video processor (:class:`Gemma4ProcessorWithoutVideo`): images and audio
go through exactly the same code. Audio is resampled to the feature
extractor's rate (:meth:`core.media.Audio.at_rate`).

``transformers`` and ``torch`` are imported here at
module level: import this module only where they are needed.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers import AutoProcessor
from transformers.models.gemma4.processing_gemma4 import Gemma4Processor
from transformers.processing_utils import ProcessorMixin

from .media import Audio, Image, Media

logger = logging.getLogger("gemma_local")

#: Per-token processor outputs: left-padded like the ids; every other output is per media item.
TOKEN_KEYS = ("token_type_ids", "mm_token_type_ids")
#: Processor outputs the model does not take.
DROPPED_KEYS = (
    "input_ids",
    "attention_mask",
    "num_soft_tokens_per_image",
    "num_soft_tokens_per_video",
)
#: Padding value of per-item outputs whose items differ in length (audio frames).
PAD_VALUES = {"image_position_ids": -1}


class _WithoutVideo(ProcessorMixin):
    """Drops the ``video_processor`` argument on its way to :class:`ProcessorMixin`."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.pop("video_processor", None)
        super().__init__(*args, **kwargs)


class Gemma4ProcessorWithoutVideo(Gemma4Processor, _WithoutVideo):
    """``Gemma4Processor`` with its image processor, audio feature extractor and tokenizer,
    and no video processor (which needs torchvision). Loads with ``from_pretrained`` from
    the same ``processor_config.json``; images and audio are processed by the parent's code."""

    def __init__(
        self,
        feature_extractor: Any,
        image_processor: Any,
        tokenizer: Any,
        chat_template: Any = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            feature_extractor,
            image_processor,
            tokenizer,
            None,
            chat_template=chat_template,
            **kwargs,
        )


def load_processor(source: str, model_type: str | None, **kwargs: Any) -> Any:
    """The checkpoint's processor (``AutoProcessor``; Gemma 4 without its video processor
    when that cannot load). Raises ``ValueError`` when the checkpoint ships none.

    Once mlx-vlm's Gemma modules are imported (by the caller; gemma-local puts
    ``AutoProcessor`` back after its own import, see :mod:`core.mlx_media`),
    ``AutoProcessor`` answers with mlx-vlm's processors, which return MLX arrays;
    then transformers' class of the same name is loaded instead."""
    try:
        processor = AutoProcessor.from_pretrained(source, **kwargs)
        if not type(processor).__module__.startswith("mlx_vlm."):
            return processor
        import transformers

        return getattr(transformers, type(processor).__name__).from_pretrained(source, **kwargs)
    except Exception as exc:
        if model_type not in ("gemma4", "gemma4_unified"):
            raise _no_processor(source, exc) from exc
        logger.info("loading Gemma 4's processor without its video processor (%s)", exc)
    try:
        return Gemma4ProcessorWithoutVideo.from_pretrained(source, **kwargs)
    except Exception as exc:
        raise _no_processor(source, exc) from exc


def _no_processor(source: str, exc: BaseException) -> ValueError:
    return ValueError(
        f"{source} has no processor that gemma-local can load ({type(exc).__name__}: {exc}); "
        "a checkpoint that reads images or audio ships processor_config.json (or "
        "preprocessor_config.json) beside its weights"
    )


@dataclass(frozen=True, eq=False)
class MediaInputs:
    """What the processor made of one prompt's media besides its ids (batch dimension 1
    for per-token tensors, one row per image / crop / audio for the others)."""

    tensors: Mapping[str, Any]
    media_tokens: int


def encode(
    processor: Any,
    text: str,
    media: Sequence[Media],
    options: Mapping[str, Any],
    *,
    add_special_tokens: bool,
    text_ids: int,
) -> tuple[tuple[int, ...], MediaInputs]:
    """The processor's ids and tensors for one rendered prompt and its media (in order).

    ``options``: the image processor's keyword arguments (the family's
    :meth:`~core.families.Family.processor_options`). ``text_ids``: the
    number of ids of the text alone, to count the media's tokens.
    """
    images = [m.image for m in media if isinstance(m, Image)]
    audio = [m for m in media if isinstance(m, Audio)]
    kwargs: dict[str, Any] = dict(options)
    if images:
        kwargs["images"] = [images]
    if audio:
        extractor = getattr(processor, "feature_extractor", None)
        rate = int(getattr(extractor, "sampling_rate", 16_000))
        kwargs["audio"] = [a.at_rate(rate) for a in audio]
        kwargs["sampling_rate"] = rate
    out = processor(
        text=[text], return_tensors="pt", add_special_tokens=add_special_tokens, **kwargs
    )
    ids = tuple(int(t) for t in out["input_ids"][0].tolist())
    tensors = {
        k: v for k, v in out.items() if k not in DROPPED_KEYS and isinstance(v, torch.Tensor)
    }
    return ids, MediaInputs(tensors, len(ids) - text_ids)


def _pad_to(tensor: Any, shape: Sequence[int], value: Any) -> Any:
    """``tensor`` padded at the end of each dimension after the first to ``shape``."""
    pads: list[int] = []
    for have, want in zip(reversed(tensor.shape[1:]), reversed(shape), strict=True):
        pads += [0, want - have]
    if not any(pads):
        return tensor
    return torch.nn.functional.pad(tensor, pads, value=value)


def merge(prompts: Sequence[Any], width: int, device: Any, dtype: Any) -> dict[str, Any]:
    """``generate``'s media keyword arguments for a left-padded batch of ``width`` columns.

    Per-token outputs (:data:`TOKEN_KEYS`) are left-padded with 0 like the ids
    (rows without media: all 0); per-item outputs (``pixel_values``, position
    ids, audio features and masks) are concatenated in row order, which is the
    order of the media tokens in the batch, padded to the longest item. Floating
    tensors take the model's dtype.
    """
    rows: list[Mapping[str, Any]] = [
        p.media.tensors if isinstance(p.media, MediaInputs) else {} for p in prompts
    ]
    keys = sorted({k for r in rows for k in r})
    merged: dict[str, Any] = {}
    for key in keys:
        if key in TOKEN_KEYS:
            columns = []
            for row, prompt in zip(rows, prompts, strict=True):
                values = row.get(key)
                line = torch.zeros(width, dtype=torch.long)
                if values is not None:
                    line[width - len(prompt.ids) :] = values[0]
                columns.append(line)
            merged[key] = torch.stack(columns).to(device)
            continue
        items = [r[key] for r in rows if key in r]
        shape = [max(t.shape[d] for t in items) for d in range(1, items[0].dim())]
        value: Any = PAD_VALUES.get(key, False if items[0].dtype == torch.bool else 0)
        tensor = torch.cat([_pad_to(t, shape, value) for t in items])
        if tensor.is_floating_point():
            tensor = tensor.to(dtype)
        merged[key] = tensor.to(device)
    return merged
