"""Images and audio on the MLX backend, through mlx-vlm.

mlx-lm has no vision or audio towers, so a request whose messages hold images
or audio goes through mlx-vlm's model of the checkpoint (Gemma 3, 3n, 4);
text-only requests keep mlx-lm's (see :mod:`core.mlx_backend`). Both feed the
same :class:`~core.stream.TokenSink`: end ids, stop strings, ``max_tokens``,
usage, tools / JSON grammars and Gemma 4's thinking are core's, as for text.

Data flow (all on the one MLX thread, :func:`core.worker.shared_worker`)::

    first request with media ──load(checkpoint, text model)──▶ VisionModel
        mlx-vlm's model built lazily; its language model takes mlx-lm's arrays
        (share_language_weights), so only the towers are read from disk
    rendered prompt + decoded media (core.media)
        ──encode(VisionModel, text, media, options)──▶ ids (soft tokens expanded)
        + MediaInputs (mlx-vlm's processor: pixel_values, attention mask, token
        types, audio features)
    Prompt ──generate_row(...)──▶ mlx_vlm.generate.generate_step: prefill with the
        media, then one token per step ──▶ sink.push_row

**One set of weights.** The language model's weights are the larger part of a
multimodal checkpoint. mlx-vlm's model is built with ``lazy=True`` (nothing is
read yet), its language-model parameters are replaced by the arrays mlx-lm
already holds (:func:`share_language_weights`: the same names, shapes and
dtypes in both packages for Gemma 3 and Gemma 4, tied heads included; Gemma
3n's under another prefix, :data:`LANGUAGE_PREFIXES`), and
then only what is left (vision and audio towers, projectors) is evaluated, so
memory grows by the towers only. If the two trees ever disagree (another
mlx-vlm version, a layout this code does not know), mlx-vlm keeps its own
weights and a warning says that the language model is held twice.

**The processor** is mlx-vlm's for the checkpoint (its ``Gemma3Processor`` over
transformers' PIL image processor; its own ``Gemma4Processor``, image
processor and audio feature extractor), so the ids, soft-token counts and
tensors are those mlx-vlm's own ``generate`` would use. The ids equal the
transformers backend's; Gemma 3's ``pixel_values`` too, bit for bit; Gemma 4's
image processor and mel features are mlx-vlm's numpy re-implementations (close,
not identical; see ``tests/test_core_media.py``).

**Prefill and decode** are mlx-vlm's ``generate_step`` (its
``get_input_embeddings`` merges the media features into the prompt's
embeddings, the chunked prefill and the decode loop are its own), with core's
sampler and logits processors. mlx-vlm hands the processors the tokens from its
last prefill chunk on; :func:`_whole_context` puts the rest of the prompt in
front, so a repetition penalty reads the same history as on mlx-lm.

Limits: mlx-vlm's Gemma 3 attends causally over image tokens (transformers'
Gemma 3 attends both ways within one image), so greedy replies about images
differ between the backends on Gemma 3; rows with media run one after another
(a batch that mixes them still returns each row's own reply); LoRA adapters
(``adapter_path``) apply to mlx-lm's text model only, so media requests are
refused on a client with adapters.

**transformers.AutoProcessor.** Importing mlx-vlm's Gemma modules replaces
``AutoProcessor.from_pretrained`` for the whole process (mlx-vlm's processors,
MLX arrays, for Gemma checkpoints). gemma-local puts it back after its own
import (:func:`_auto_processor_kept`) and builds mlx-vlm's processor by its
class; the transformers backend also takes transformers' class when the patch
is there anyway. A program that calls mlx-vlm's own ``load`` for Gemma in the
same process relies on that patch: it should import mlx-vlm's Gemma modules
first (``import mlx_vlm.models.gemma3, mlx_vlm.models.gemma4``), whose patch is
then left as it was.

``mlx`` and ``mlx_vlm`` are imported inside the functions, on the MLX thread.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import require
from .media import Audio, Image, Media

logger = logging.getLogger("gemma_local")

#: Processor outputs that are not model inputs (``attention_mask`` is passed as ``mask``).
DROPPED_KEYS = ("input_ids", "num_soft_tokens_per_image")

#: mlx-vlm's processor class per model type (in ``mlx_vlm.models.<type>.processing_<type>``).
PROCESSORS = {
    "gemma3": "Gemma3Processor",
    "gemma3n": "Gemma3nProcessor",
    "gemma4": "Gemma4Processor",
    "gemma4_unified": "Gemma4UnifiedProcessor",
}


@dataclass(frozen=True, eq=False)
class VisionModel:
    """mlx-vlm's model of the checkpoint and its processor; ``shared``: whether its
    language model holds mlx-lm's arrays (see :func:`share_language_weights`);
    ``image_defaults``: image options its processor is given unless the request's
    options say otherwise (see :func:`_image_defaults`)."""

    model: Any
    processor: Any
    shared: bool
    image_defaults: Mapping[str, Any]


@dataclass(frozen=True, eq=False)
class MediaInputs:
    """What mlx-vlm's processor made of one prompt's media besides its ids (MLX arrays,
    batch dimension 1): ``pixel_values``, the attention mask, token types, audio features."""

    arrays: Mapping[str, Any]
    media_tokens: int


#: Where mlx-lm's tree holds a parameter that mlx-vlm's holds under another prefix, per
#: model type: mlx-vlm's gemma3n has ``language_model.model.*``, mlx-lm's
#: ``model.language_model.*`` (the same modules below that).
LANGUAGE_PREFIXES = {"gemma3n": ("language_model.model.", "model.language_model.")}


def share_language_weights(
    vision_model: Any, text_model: Any, prefixes: tuple[str, str] | None = None
) -> bool:
    """Give mlx-vlm's (lazily loaded) language model mlx-lm's arrays; ``True`` when done.

    Every ``language_model.*`` parameter of ``vision_model`` must be found in
    ``text_model`` under the same name (with ``prefixes`` = ``(theirs, ours)``:
    its prefix ``theirs`` read as ``ours``) with the same shape and dtype, or be
    the very array of one that is (a head tied to the embeddings); otherwise
    nothing is replaced and ``False`` comes back.
    """
    from mlx.utils import tree_flatten

    ours = dict(tree_flatten(text_model.parameters()))
    theirs = [
        (name, value)
        for name, value in tree_flatten(vision_model.parameters())
        if name.startswith("language_model.")
    ]
    by_id: dict[int, Any] = {}
    replaced: list[tuple[str, Any]] = []
    aliases = []
    for name, value in theirs:
        if prefixes is not None and name.startswith(prefixes[0]):
            mine = ours.get(prefixes[1] + name.removeprefix(prefixes[0]))
        else:
            mine = ours.get(name)
        if mine is None:
            aliases.append((name, value))
            continue
        if mine.shape != value.shape or mine.dtype != value.dtype:
            return False
        by_id[id(value)] = mine
        replaced.append((name, mine))
    for name, value in aliases:
        mine = by_id.get(id(value))
        if mine is None:
            return False
        replaced.append((name, mine))
    if not replaced:
        return False
    vision_model.load_weights(replaced, strict=False)
    return True


@contextlib.contextmanager
def _auto_processor_kept() -> Iterator[None]:
    """Puts ``transformers.AutoProcessor.from_pretrained`` back as it was on the way out.

    Importing mlx-vlm's Gemma modules replaces it, for the whole process, with a
    version that returns mlx-vlm's processors (MLX arrays) for Gemma checkpoints,
    which would reach the transformers backend's processor too. gemma-local
    builds mlx-vlm's processor by its class instead (:data:`PROCESSORS`).
    """
    from transformers import AutoProcessor

    saved = AutoProcessor.__dict__["from_pretrained"]
    try:
        yield
    finally:
        if AutoProcessor.__dict__["from_pretrained"] is not saved:
            type.__setattr__(AutoProcessor, "from_pretrained", saved)


def _processor(folder: Path, model_type: str) -> Any:
    from mlx_vlm.utils import load_image_processor

    name = PROCESSORS.get(model_type)
    if name is None:
        raise ValueError(
            f"gemma-local reads images and audio on MLX for model types {sorted(PROCESSORS)}, "
            f"not {model_type!r}"
        )
    module = importlib.import_module(f"mlx_vlm.models.{model_type}.processing_{model_type}")
    processor = getattr(module, name).from_pretrained(str(folder))
    image_processor = load_image_processor(folder)  # as mlx_vlm.load does
    if image_processor is not None:
        processor.image_processor = image_processor
    return processor


def _image_defaults(processor: Any, model_type: str) -> dict[str, Any]:
    """What transformers' ``Gemma3Processor`` gives its image processor where the checkpoint's
    ``preprocessor_config.json`` holds ``null`` (RGB conversion, the pan-and-scan crop sizes),
    and mlx-vlm's passes on only when asked (without them ``pan_and_scan=True`` fails, and
    an RGBA or grey image keeps its channels)."""
    if model_type != "gemma3":
        return {}
    from transformers import Gemma3Processor

    image_processor = getattr(processor, "image_processor", None)
    return {
        key: value
        for key, value in Gemma3Processor.images_kwargs.items()
        if getattr(image_processor, key, None) is None
    }


def _fix_image_scale(model: Any, config: Mapping[str, Any], model_type: str) -> None:
    """mlx-vlm's Gemma 3 divides the image features by the square root of the config's
    top-level ``hidden_size`` (its default 2048 when the key is absent; transformers 5 does
    not write it) before its language model multiplies every embedding by that of the text
    ``hidden_size``; transformers inserts the features unscaled. Without the key the text
    model's width is the right one (else, e.g. at 2560 wide, features 12% too large)."""
    if model_type == "gemma3" and "hidden_size" not in config:
        model.config.hidden_size = model.config.text_config.hidden_size


def load(path: str, text_model: Any) -> VisionModel:
    """mlx-vlm's model and processor for the checkpoint at ``path`` (a folder or hub id that
    mlx-lm has already fetched), its language weights shared with ``text_model``."""
    require("mlx_vlm", feature="Images and audio on the MLX backend")
    import mlx.core as mx
    from mlx_vlm.utils import get_model_path, get_model_type, load_config, load_model

    folder = Path(get_model_path(path))
    with _auto_processor_kept():
        try:
            model = load_model(folder, lazy=True)
        except (ValueError, FileNotFoundError, KeyError) as exc:  # weights it lacks
            raise ValueError(
                f"mlx-vlm cannot load {path} with its vision / audio towers "
                f"({type(exc).__name__}: {exc}). A "
                "checkpoint converted by mlx_lm.convert has lost them; use the original "
                "checkpoint or one converted by mlx_vlm.convert"
            ) from exc
        config = load_config(folder)
        model_type = str(get_model_type(config))
        processor = _processor(folder, model_type)
    _fix_image_scale(model, config, model_type)
    shared = share_language_weights(model, text_model, LANGUAGE_PREFIXES.get(model_type))
    if not shared:
        logger.warning(
            "mlx-vlm's language model of %s does not match mlx-lm's; it keeps weights of its "
            "own (the language model is held twice in memory)",
            path,
        )
    mx.eval(model.parameters())
    return VisionModel(model, processor, shared, _image_defaults(processor, model_type))


def encode(
    vision: VisionModel,
    text: str,
    media: Sequence[Media],
    options: Mapping[str, Any],
    *,
    add_special_tokens: bool,
    text_ids: int,
) -> tuple[tuple[int, ...], MediaInputs]:
    """mlx-vlm's processor on one rendered prompt and its media (in order): the ids and
    the arrays ``generate_step`` reads. ``options``: the family's processor options;
    ``text_ids``: the number of ids of the text alone, to count the media's tokens."""
    processor = vision.processor
    images = [m.image for m in media if isinstance(m, Image)]
    audio = [m for m in media if isinstance(m, Audio)]
    kwargs: dict[str, Any] = {}
    if images:
        kwargs.update(vision.image_defaults, **options, images=images)
    if audio:
        extractor = getattr(processor, "feature_extractor", None)
        rate = int(getattr(extractor, "sampling_rate", 16_000))
        kwargs["audio"] = [a.at_rate(rate) for a in audio]
    out = processor(text=[text], add_special_tokens=add_special_tokens, **kwargs)
    ids = tuple(int(t) for t in out["input_ids"][0].tolist())
    arrays = {k: v for k, v in out.items() if k not in DROPPED_KEYS}
    return ids, MediaInputs(arrays, len(ids) - text_ids)


def _whole_context(
    processors: Sequence[Callable[[Any, Any], Any]], prompt: Sequence[int]
) -> list[Callable[[Any, Any], Any]]:
    """``processors`` that read the whole prompt before the tokens mlx-vlm hands them.

    mlx-vlm passes the tokens from its last prefill chunk on (mlx-lm: the whole
    prompt); the part of the prompt it left out is put in front, once measured.
    """
    import mlx.core as mx

    def whole(processor: Callable[[Any, Any], Any]) -> Callable[[Any, Any], Any]:
        head: Any = None

        def process(tokens: Any, logits: Any) -> Any:
            nonlocal head
            if head is None:
                head = mx.array(list(prompt[: max(0, len(prompt) - tokens.size)]), tokens.dtype)
            return processor(mx.concatenate([head, tokens]) if head.size else tokens, logits)

        return process

    return [whole(p) for p in processors]


def generate_row(
    vision: VisionModel,
    ids: Sequence[int],
    inputs: MediaInputs,
    *,
    max_tokens: int,
    sampler: Callable[[Any], Any],
    logits_processors: Sequence[Callable[[Any, Any], Any]],
    max_kv_size: int | None,
    prefill_step_size: int,
    push: Callable[[int], bool],
) -> None:
    """One prompt with media through mlx-vlm's ``generate_step``; each token goes to
    ``push``, which says whether the row is finished. The caller holds mlx-lm's
    ``wired_limit`` (the language weights are the same arrays)."""
    import mlx.core as mx
    from mlx_vlm.generate import generate_step

    arrays = dict(inputs.arrays)
    pixel_values = arrays.pop("pixel_values", None)
    mask = arrays.pop("attention_mask", None)
    if mask is None:
        mask = mx.ones((1, len(ids)), dtype=mx.int32)
    steps = generate_step(
        mx.array(list(ids))[None],
        vision.model,
        pixel_values,
        mask,
        max_tokens=max_tokens,
        sampler=sampler,
        logits_processors=_whole_context(logits_processors, ids),
        max_kv_size=max_kv_size,
        prefill_step_size=prefill_step_size,
        **arrays,
    )
    try:
        for token, _ in steps:
            if push(int(token)):
                break
    finally:
        steps.close()
